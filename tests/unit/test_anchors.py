import numpy as np
import pytest

from icl_router import schemas as S
from icl_router.config import AnchorsConfig, ConfigError
from icl_router.data.anchors import run_anchors, select_anchors
from icl_router.data.splits import make_split


def pool(n=400, m=5, seed=0):
    rng = np.random.RandomState(seed)
    correct = rng.rand(n, m) < rng.rand(n, 1)  # [Q, M]: a per-query difficulty spreads queries over all strata
    return correct, [f"q{i}" for i in range(n)]


def test_equal_strata_remainder_to_lowest_and_positions():
    correct, ids = pool()
    t = select_anchors(correct, ids, k=10, seed=0)  # 4 strata: 3, 3, 2, 2
    n_correct = t.column(S.N_CORRECT).to_pylist()
    assert [n_correct.count(s) for s in (1, 2, 3, 4)] == [3, 3, 2, 2]
    assert t.column(S.POSITION).to_pylist() == list(range(10))
    assert n_correct == sorted(n_correct)
    rows = [ids.index(q) for q in t.column(S.QUERY_ID).to_pylist()]
    assert len(set(rows)) == 10
    assert [int(correct[r].sum()) for r in rows] == n_correct  # the stored count is the real one


def test_deterministic_per_seed_and_seeds_differ():
    correct, ids = pool()
    a = select_anchors(correct, ids, k=40, seed=1)
    assert a.equals(select_anchors(correct, ids, k=40, seed=1))
    assert a.column(S.QUERY_ID).to_pylist() != select_anchors(correct, ids, k=40, seed=2).column(S.QUERY_ID).to_pylist()


def test_all_or_none_and_incomplete_queries_are_never_anchors():
    correct, ids = pool(n=300)
    correct = correct.astype(np.float32)
    correct[:50] = np.nan * np.ones(5)
    correct[50:100, 0] = np.nan  # one model's outcome missing
    t = select_anchors(correct, ids, k=60, seed=0)
    chosen = {ids.index(q) for q in t.column(S.QUERY_ID).to_pylist()}
    assert not chosen & set(range(100))
    sums = correct[sorted(chosen)].sum(axis=1)
    assert sums.min() >= 1 and sums.max() <= 4


def test_fractional_correctness_counts_at_threshold():
    correct = np.array([[0.5, 0.4, 1.0], [0.2, 0.0, 0.6], [1.0, 1.0, 0.5], [0.0, 0.0, 0.0]])  # mean over samples
    t = select_anchors(correct, ["a", "b", "c", "d"], k=2, seed=0)
    assert dict(zip(t.column(S.QUERY_ID).to_pylist(), t.column(S.N_CORRECT).to_pylist())) == {"a": 2, "b": 1}


def test_a_short_stratum_gives_all_it_has_and_the_rest_is_shared_out():
    correct, ids = pool(n=100)
    have = [int((correct.sum(axis=1) == s).sum()) for s in (1, 2, 3, 4)]
    k = sum(have) - 5  # well over 4x the smallest stratum: its equal share cannot be met
    t = select_anchors(correct, ids, k=k, seed=0)
    got = [t.column(S.N_CORRECT).to_pylist().count(s) for s in (1, 2, 3, 4)]
    assert sum(got) == k and all(g <= h for g, h in zip(got, have))
    assert min(have) < k // 4 and got[have.index(min(have))] == min(have)  # the short stratum is used up
    assert max(got) - min(g for g, h in zip(got, have) if g < h) <= 1  # the others stay level
    assert len(set(t.column(S.QUERY_ID).to_pylist())) == k


def test_k_beyond_every_informative_query_names_the_limit():
    correct, ids = pool(n=100)
    informative = int(((correct.sum(axis=1) > 0) & (correct.sum(axis=1) < 5)).sum())
    with pytest.raises(ConfigError, match=rf"only {informative} train queries tell models apart.*k <= {informative}"):
        select_anchors(correct, ids, k=informative + 1, seed=0)
    assert len(select_anchors(correct, ids, k=informative, seed=0)) == informative


def test_run_anchors_uses_only_train_part(small_dataset, tmp_path):
    cfg = AnchorsConfig(dataset=str(small_dataset.root), k=6, seed=3)
    summary = run_anchors(cfg)
    assert summary["anchors"] == 6 and summary["per_stratum"] == {1: 2, 2: 2, 3: 2}
    table = small_dataset.read_anchors()
    train = make_split(small_dataset.read_queries(), cfg.split).train
    assert set(table.column(S.QUERY_ID).to_pylist()) <= set(train)
    models = small_dataset.model_ids()
    assert table.equals(select_anchors(small_dataset.correctness(train, models), train, k=6, seed=3))

    out = tmp_path / "elsewhere.parquet"
    run_anchors(cfg.model_copy(update={"output": str(out), "seed": 4}))
    assert out.is_file() and small_dataset.read_anchors().equals(table)  # cfg.output leaves the default file alone
