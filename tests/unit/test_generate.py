"""The synthetic embedded-default dataset: layout, determinism, and that routing on it pays."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from icl_router import cli
from icl_router import schemas as S
from icl_router.config import ConfigError
from icl_router.data.dataset import Dataset
from icl_router.data.generate import MODELS, GenerateConfig, generate_dataset, generate_tables


def _matrix(queries, outcomes) -> tuple[np.ndarray, list[str]]:
    """correct as float [Q, M] in query order; every (query, model) cell exactly once."""
    ids = {q: i for i, q in enumerate(queries.column(S.QUERY_ID).to_pylist())}
    models = sorted(set(outcomes.column(S.MODEL_ID).to_pylist()))
    col = {m: j for j, m in enumerate(models)}
    C = np.full((len(ids), len(models)), np.nan)
    for q, m, c in zip(outcomes.column(S.QUERY_ID).to_pylist(), outcomes.column(S.MODEL_ID).to_pylist(), outcomes.column(S.CORRECT).to_pylist()):
        assert np.isnan(C[ids[q], col[m]]), (q, m)
        C[ids[q], col[m]] = c
    assert not np.isnan(C).any()
    return C, models


@pytest.fixture(scope="module", params=[0, 1, 2])
def seeded(request):
    cfg = GenerateConfig(seed=request.param)
    queries, outcomes = generate_tables(cfg)
    C, models = _matrix(queries, outcomes)
    return cfg, queries, C, models, np.array(queries.column(S.TASK).to_pylist()), np.array(queries.column(S.SPLIT).to_pylist())


def test_same_seed_same_dataset_other_seed_other_dataset():
    a, b, c = (generate_tables(GenerateConfig(seed=s, n_queries=300)) for s in (7, 7, 8))
    assert a[0].equals(b[0]) and a[1].equals(b[1])  # determinism: the same seed gives the same bits, floats included
    assert not a[0].equals(c[0]) and not a[1].equals(c[1])


def test_written_layout_conforms(tmp_path):
    t = time.perf_counter()
    ds = generate_dataset(tmp_path / "synth", GenerateConfig(seed=0))
    print(f"generate: 2000 queries in {time.perf_counter() - t:.1f} s")  # a figure to read, not a check
    queries, outcomes = ds.read_queries(), ds.read_outcomes()  # both conform to the schemas on read
    assert queries.schema.equals(S.QUERIES_SCHEMA) and outcomes.schema.equals(S.OUTCOMES_SCHEMA)
    assert len(queries) == 2000 and len(set(queries.column(S.TEXT).to_pylist())) == 2000
    assert sorted(ds.model_ids()) == sorted(list(MODELS)[:6])
    _matrix(queries, outcomes)
    # larger models cost more per token
    tokens = outcomes.column(S.PROMPT_TOKENS).to_numpy() + outcomes.column(S.COMPLETION_TOKENS).to_numpy()
    per_token = outcomes.column(S.COST).to_numpy() / tokens
    models = np.array(outcomes.column(S.MODEL_ID).to_pylist())
    rate = {m: per_token[models == m] for m in set(models)}
    assert all(np.allclose(r, r[0]) for r in rate.values())  # one price per token per model
    assert all(rate[a][0] < rate[b][0] for a in rate for b in rate if MODELS[a][0] < MODELS[b][0])


def test_splits_hold_out_the_ood_families(seeded):
    cfg, _, _, _, family, split = seeded
    assert set(split[np.isin(family, cfg.ood_families)]) == {"ood"}
    id_split = split[~np.isin(family, cfg.ood_families)]
    assert set(id_split) == {"train", "test"}
    assert abs((id_split == "train").mean() - cfg.train_fraction) < 0.01
    assert set(cfg.ood_families) <= set(family)


def test_best_model_differs_across_families(seeded):
    _, _, C, models, family, _ = seeded
    best = {f: models[C[family == f].mean(0).argmax()] for f in set(family)}
    assert len(set(best.values())) >= 3, best


def test_oracle_is_far_above_the_best_single_model(seeded):
    _, _, C, _, _, split = seeded
    for part in ("test", "ood"):
        rows = C[split == part]
        assert rows.max(1).mean() - rows.mean(0).max() >= 0.15, part


def test_routing_by_family_learned_on_train_beats_best_single_on_test(seeded):
    _, _, C, _, family, split = seeded
    train, test = split == "train", split == "test"
    single = C[test, C[train].mean(0).argmax()].mean()
    rule = {f: C[train & (family == f)].mean(0).argmax() for f in set(family[train])}
    routed = np.mean([C[i, rule[family[i]]] for i in np.flatnonzero(test)])
    assert routed >= single + 0.03, (routed, single)


def test_texts_tell_families_apart(seeded):
    """A bag-of-words nearest-centroid classifier fitted on train names the family of test queries."""
    _, queries, _, _, family, split = seeded
    texts = queries.column(S.TEXT).to_pylist()
    vocab = {w: i for i, w in enumerate(sorted({w for t in texts for w in t.lower().split()}))}
    X = np.zeros((len(texts), len(vocab)))
    for i, t in enumerate(texts):
        for w in t.lower().split():
            X[i, vocab[w]] = 1.0
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    fams = sorted(set(family[split == "train"]))
    centroids = np.stack([X[(split == "train") & (family == f)].mean(0) for f in fams])
    test = split == "test"
    predicted = np.array(fams)[(X[test] @ centroids.T).argmax(1)]
    assert (predicted == family[test]).mean() > 0.95


def test_code_queries_gold_is_what_python_computes(seeded):
    _, queries, _, _, family, _ = seeded
    rows = [r for r, f in zip(queries.to_pylist(), family) if f == "code"]
    levels = Counter(r[S.METRIC] for r in rows)
    assert len(levels) == 3, levels  # all three difficulties present
    for r in rows[:60]:
        code = r[S.TEXT].split("\n", 1)[1]
        env, out = {}, io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, env)  # our own template text, not outside input
        got = out.getvalue().strip() if "print(" in code else env["total"] if "total" in env else env["f"](int(r[S.TEXT].split("f(")[1].split(")")[0]))
        assert str(got) == r[S.GOLD], r[S.TEXT]


def test_impossible_pools_are_refused():
    with pytest.raises(ConfigError, match="n_models"):
        generate_tables(GenerateConfig(n_models=len(MODELS) + 1))
    with pytest.raises(ConfigError, match="subset"):
        generate_tables(GenerateConfig(ood_families=["poetry"]))
    with pytest.raises(ConfigError, match="poetry"):
        generate_tables(GenerateConfig(families=["poetry", "units"], ood_families=["units"]))
    with pytest.raises(ValidationError, match="in-distribution"):  # no table needed: refused with the config
        GenerateConfig(families=["units"], ood_families=["units"])


def test_cli_generate(tmp_path, capsys):
    cli.main(["generate", "--output", str(tmp_path / "g"), "--n-queries", "120", "--n-models", "4", "--seed", "3"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_queries"] == 120 and summary["n_models"] == 4 and summary["n_outcomes"] == 480
    assert set(summary["splits"]) == {"train", "test", "ood"}
    assert Dataset(tmp_path / "g").read_queries().equals(generate_tables(GenerateConfig(seed=3, n_queries=120, n_models=4))[0])


def test_every_grader_is_registered(tmp_path):
    from icl_router.graders import GRADERS

    ds = generate_dataset(tmp_path / "g", GenerateConfig(n_queries=200))
    assert set(ds.read_queries().column("grader").to_pylist()) <= set(GRADERS)
