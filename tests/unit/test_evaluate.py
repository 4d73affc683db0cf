"""The quick evaluation end to end on a small slice of the real data (tiny router, few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icl_router.config import EvaluateConfig, load_config
from icl_router.evaluation.baselines import earliest_within_se, routed_hits
from icl_router.evaluation.cost import aiq, hull_curve
from icl_router.evaluation.run import METHODS, run_evaluate

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = "{hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 128, vocab_size: 600}"


def _slice(src: Path, dst: Path, *, every: int, models: int) -> None:
    """Every ``every``-th record, with the first ``models`` models' labels (and costs) only."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with src.open() as f:
        for i, line in enumerate(f):
            if i % every == 0:
                rec = json.loads(line)
                keep = sorted(rec["labels"])[:models]
                for field in ("labels", "cost"):
                    if field in rec:
                        rec[field] = {m: rec[field][m] for m in keep}
                out.append(json.dumps(rec) + "\n")
    dst.write_text("".join(out))


def test_hull_and_aiq_follow_routerbench():
    pts = [[1.0, 50.0], [2.0, 60.0], [3.0, 62.0], [4.0, 61.0], [1.5, 40.0], [5.0, 80.0]]
    # (3, 62) lies under the chord (2, 60)-(5, 80); dominated points never reach the hull
    # the hull keeps input points as they are; a tolerance far below their spacing
    np.testing.assert_allclose(hull_curve(pts), [[1.0, 50.0], [2.0, 60.0], [5.0, 80.0]], atol=1e-9)
    assert aiq(pts, c_min=1.0, c_max=5.0) == pytest.approx((55.0 * 1 + 70.0 * 3) / 4, abs=1e-6)


def test_a_later_router_is_kept_only_when_it_wins_by_more_than_a_standard_error():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.6).astype(float)  # [400] the untrained router's per-query correctness
    slightly = base.copy()
    slightly[np.flatnonzero(base == 0)[:10]] = 1.0  # 10 queries won and 7 lost of 400: a gain inside the noise
    slightly[np.flatnonzero(base == 1)[:7]] = 0.0
    clearly = base.copy()
    clearly[np.flatnonzero(base == 0)[:60]] = 1.0  # 60 more right: far outside it
    assert earliest_within_se([base, slightly]) == 0
    assert earliest_within_se([base, slightly, clearly]) == 2
    assert earliest_within_se([clearly, base]) == 0  # the simplest is also the best
    worse = base.copy()
    worse[np.flatnonzero(base == 1)[:60]] = 0.0
    assert earliest_within_se([worse, slightly, clearly]) == 2
    # unlabelled queries (NaN) drop out of the comparison instead of making it NaN
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    labels = np.array([[1.0, 0.0], [np.nan, 1.0]])
    np.testing.assert_allclose(routed_hits(scores, labels), [1.0, 1.0])
    with_nan = np.where(np.arange(400) % 50 == 0, np.nan, clearly)
    assert earliest_within_se([base, with_nan]) == 1


@pytest.mark.slow  # the whole evaluate job (training included) on a slice: no Ray, but long for the unit tier
def test_quick_evaluation_on_a_slice(tmp_path):
    llm, rb = SHARED_DATA / "routing" / "llmrouter", SHARED_DATA / "routing" / "routerbench"
    if not llm.is_dir() or not rb.is_dir():
        pytest.skip(f"real data {SHARED_DATA}/routing is absent (expected ../shared/data beside the repo)")
    root = tmp_path / "data"
    for name in ("train.jsonl", "test.jsonl"):
        _slice(llm / name, root / "routing" / "llmrouter" / name, every=20, models=4)  # ~300 queries, every task
    for f in sorted(rb.glob("*.jsonl")):
        _slice(f, root / "routing" / "routerbench" / f.name, every=40, models=5)
    datasets = (
        "datasets=[{name: llmrouter, dataset: routing/llmrouter, format: llmrouter, k: 6},"
        " {name: synthetic, generate: {seed: 0, n_queries: 240, n_models: 4},"
        " split: {name: standard, id_tasks: [arithmetic, code, geography, logic], ood_tasks: [spelling, units]}, k: 6}]"
    )
    router = [f"{v}.router.tiny={TINY}" for v in ("icl_router", "icl_router_text")]
    steps = [f"{v}.{k}" for v in ("icl_router", "icl_router_text") for k in ("k=6", "max_steps=30", "eval_every=15", "max_text_tokens=24", "phases=[{epochs: 2, lr_projector: 3.0e-3, lr_router: 3.0e-3}]")]
    cfg = load_config(
        EvaluateConfig,
        REPO / "jobs" / "evaluate" / "quick.yaml",
        [f"data_root={root}", f"cache_dir={tmp_path / 'cache'}", f"output={tmp_path / 'report'}", datasets, "add_model=true", "k_sweep=[3, 6]",
         "pool_sizes=[3]", "sweep_max_steps=5", "threads=1", "routerbench.k=4", "routerbench.reference_model=claude-v2", "icl_router_text={}", *router, *steps],
    )
    summary = run_evaluate(cfg)
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    assert set(report["datasets"]) == {"llmrouter", "synthetic"} and summary["output"] == str(out)
    assert report["methods"] == report["datasets"]["llmrouter"]["methods"]  # the first dataset's table, at the top level too
    for name, rep in report["datasets"].items():
        methods = rep["methods"]
        assert set(methods) == set(METHODS), name
        for m in METHODS:
            for part in ("id", "ood"):
                assert set(methods[m][part]) >= {"mean", "std"} and 0 <= methods[m][part]["mean"] <= 100
        for part in ("id", "ood"):
            others = [methods[m][part]["mean"] for m in METHODS if m != "oracle"]
            assert methods["oracle"][part]["mean"] >= max(others) - 1e-9  # no router can beat the oracle, whatever the data
            cal = rep["calibration"][part]
            assert 0 <= cal["ece"] <= 1 and 0 <= cal["brier"] <= 1 and 0 <= cal["away_from_default"] <= 100 and cal["reliability"]
        assert set(report["delta"][name]["id"]) == {"vs_best_single", "vs_knn_tuned", "vs_knn_tuned_task"}
        decision = rep["decision"]["0"]
        assert decision["tau"] > 0 and decision["fitted"]["rows"] > 0
        info = rep["train_info"]["icl-router/0"]  # validation checked step 0, every 15 steps and the last, and kept one of them
        steps = [s for s, _ in info["val_curve"]]
        assert steps[0] == 0 and steps[-1] == info["steps"] and 15 in steps and info["kept_step"] in steps
    assert set(report["delta"]["mean"]["all"]) == {"vs_best_single", "vs_knn_tuned", "vs_knn_tuned_task"}
    assert [a["model"] for a in report["add_model"]] == report["models"]
    assert [k["k"] for k in report["k_sweep"]] == [3, 6] and report["pool_sizes"][0]["n"] == 3
    rbr = report["routerbench"]
    assert set(rbr["aiq"]) == {"icl-router", "knn-tuned", "knn"} and rbr["single_hull_aiq"] > 0
    for key in ("acc_at_25pct_gpt4_cost", "acc_at_50pct_gpt4_cost", "cost_to_match_gpt4"):
        assert set(rbr[key]) == set(rbr["aiq"])
    assert rbr["oracle"]["quality"] >= max(s["quality"] for s in rbr["single"].values())
    for p in report["plots"]:
        assert (out / p).stat().st_size > 1000
    assert {"suite_delta.png", "reliability.png"} <= set(report["plots"])
    md = (out / "report.md").read_text()
    assert "| ICL-Router (with its decision layer; queries name their task) |" in md and "| synthetic | OOD |" in md


def test_test_sample_takes_the_same_seeded_rows_and_keeps_train():
    from icl_router.data.routing_set import RoutingSet
    from icl_router.data.splits import Split
    from icl_router.evaluation.run import sample_test

    ids = [f"q{i:03d}" for i in range(300)]
    rs = RoutingSet(models=["a", "b"], query_ids=ids, texts=ids, tasks=["t"] * 300, labels=np.zeros((300, 2), np.float32),
                    embeddings=np.zeros((300, 4), np.float32), split=Split(ids[:100], ids[100:270], ids[270:]), anchor_ids=ids[:5], embedder="e")
    assert sample_test(rs, None, seed=0) is rs
    small = sample_test(rs, 40, seed=1)
    assert small.split.train == rs.split.train and small.anchor_ids == rs.anchor_ids
    assert len(small.split.test) == 40 and small.split.test == sorted(small.split.test) and set(small.split.test) <= set(ids[100:270])
    assert small.split.ood == rs.split.ood  # 30 OOD queries: fewer than the sample, all kept
    assert sample_test(rs, 40, seed=1).split.test == small.split.test != sample_test(rs, 40, seed=2).split.test
