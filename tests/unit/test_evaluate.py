"""The quick evaluation end to end on a small slice of the real data (tiny router, few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icl_router.config import EvaluateConfig, load_config
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
    router = [f"{v}.router.tiny={TINY}" for v in ("icl_router", "icl_router_text")]
    # calibration on: 30 steps on ~300 queries can leave a router below random, and Platt scaling on
    # the validation slice brings it back to the per-model prior; this test checks the report, not the router
    steps = [f"{v}.{k}" for v in ("icl_router", "icl_router_text") for k in ("k=6", "max_steps=30", "eval_every=15", "max_text_tokens=24", "calibrate=true", "phases=[{epochs: 2, lr_projector: 3.0e-3, lr_router: 3.0e-3}]")]
    cfg = load_config(
        EvaluateConfig,
        REPO / "jobs" / "evaluate" / "quick.yaml",
        [f"data_root={root}", f"cache_dir={tmp_path / 'cache'}", f"output={tmp_path / 'report'}", "add_model=true", "k_sweep=[3, 6]", "pool_sizes=[3]", "sweep_max_steps=5", "threads=1", "routerbench.k=4", *router, *steps],
    )
    summary = run_evaluate(cfg)
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert set(methods) == set(METHODS) and summary["output"] == str(out)
    for m in METHODS:
        for part in ("id", "ood"):
            assert set(methods[m][part]) >= {"mean", "std"} and 0 <= methods[m][part]["mean"] <= 100
    for part in ("id", "ood"):
        others = [methods[m][part]["mean"] for m in METHODS if m not in ("oracle", "random")]
        assert methods["oracle"][part]["mean"] > max(others)
        assert methods["random"][part]["mean"] < min(others)
    assert [a["model"] for a in report["add_model"]] == report["models"]
    assert [k["k"] for k in report["k_sweep"]] == [3, 6] and report["pool_sizes"][0]["n"] == 3
    rbr = report["routerbench"]
    assert set(rbr["aiq"]) == {"icl-router", "knn", "single models (zero router)"}
    assert rbr["oracle"]["quality"] >= max(s["quality"] for s in rbr["single"].values())
    for p in report["plots"]:
        assert (out / p).stat().st_size > 1000
    assert "| ICL-Router (query as vector) |" in (out / "report.md").read_text()
