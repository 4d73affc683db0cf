"""`icl-router demo` (what `make demo` runs) end to end on a small synthetic pool, on local Ray."""

import json

import pytest

from icl_router.config import DemoConfig
from icl_router.demo import SERVED, run_demo
from icl_router.model.router_dir import read_meta, read_profiles

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the tier marker comes from the directory (tests/conftest.py); each test here runs a minute or more


def test_demo_runs_end_to_end_and_registers_the_held_out_model(ray_local, tmp_path):
    out = tmp_path / "demo"
    run_demo(DemoConfig(output=str(out), n_queries=400, n_models=4, held_out="synth-logic-8b", k=12, stage1_epochs=1, stage2_epochs=1))
    report = json.loads((out / "report.json").read_text())
    assert report["held_out"] == "synth-logic-8b" and "synth-logic-8b" not in report["trained_on"]
    # trained without it, registered afterwards from its anchor outcomes alone
    meta = read_meta(out / "router")
    pool = read_profiles(out / "router" / "profiles.parquet", meta.anchor_query_ids)
    assert sorted(pool) == sorted([*report["trained_on"], "synth-logic-8b"])
    for part in ("id", "ood"):
        methods = {**{m: v[part] for m, v in report["after"].items() if m not in ("away", "traffic")}, "before": report["before"]["icl-router"][part]}
        assert 0 <= report["after"]["away"][part] <= 100
        assert all(0 <= v <= methods["oracle"] + 1e-9 for v in methods.values()), methods
        assert methods["random"] < methods["oracle"]
    # valued from its profile before it was registered, beside the gain measured after
    value = report["value"]
    assert set(value) >= {"estimated_gain", "estimated_traffic_share", "measured_gain", "measured_traffic_share"}
    assert 0 <= value["estimated_traffic_share"] <= 1 and 0 <= value["measured_traffic_share"] <= 1
    assert abs(value["measured_gain"] - (report["after"]["icl-router"]["id"] - report["before"]["icl-router"]["id"])) < 1e-2
    held = json.loads((out / "value" / "value.json").read_text())
    assert [r["model"] for r in held["candidates"]] == ["synth-logic-8b"] and sorted(r["model"] for r in held["removals"]) == sorted(report["trained_on"])
    assert "estimated worth" in (out / "report.md").read_text()
    assert (out / "demo.png").stat().st_size > 10_000 and (out / "report.md").is_file()
    assert all((out / "pool" / name / "config.json").is_file() for name in SERVED)
    # the README's Python API example, on the demo's router directory
    from icl_router import Router

    router = Router.load(out / "router")
    assert router.decision is not None and sorted(router.models) == sorted(pool)  # fitted when stage 2 was trained
    decisions = router.route(["What is 17 + 25?", "Spell the word garden backwards."])
    assert all(d.model in pool and d.default in pool for d in decisions)
    assert router.scores(["What is 17 + 25?"]).shape == (1, len(pool))
