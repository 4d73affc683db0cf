"""`icl-router demo` (what `make demo` runs) end to end: real questions, the two pretrained LMs
(runs/models, converted by `make models`) joining a running service by onboarding, real questions
routed through the OpenAI-compatible API; then the router directory as serve/demo.yaml serves it."""

import json
from pathlib import Path

import pytest

from icl_router.config import DemoConfig, RayConfig
from icl_router.demo import run_demo
from icl_router.model.router_dir import read_meta, read_profiles
from icl_router.testing import served_root

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "runs" / "models"


def test_demo_onboards_the_real_models_and_routes_real_questions():
    with served_root("demo-", num_cpus=8) as root:  # the demo's outputs live under it: check them inside
        out = root / "demo"
        cfg = DemoConfig(output=str(out), models_dir=str(MODELS), data_root=str(ROOT.parent / "shared" / "data"), k=8,
                         stage1_epochs=1, stage2_epochs=1, num_workers=1, ray=RayConfig(num_cpus=8))
        run_demo_result = run_demo(cfg)
        report = json.loads((out / "report.json").read_text())
        assert run_demo_result["seconds"] > 0 and report["models"] == ["smollm2-135m-instruct", "gemma-3-270m"]
        # both joined the service through onboarding: deployed, asked every anchor, graded, registered
        meta = read_meta(out / "router")
        pool = read_profiles(out / "router" / "profiles.parquet", meta.anchor_query_ids)
        assert sorted(pool) == sorted(report["models"]) and all(len(p) == len(meta.anchor_query_ids) for p in pool.values())
        assert set(report["service"]["joined"]) == set(report["models"])
        # the anchors are questions exactly one of the two models got right when their outcomes were recorded
        recorded = report["live_vs_recorded"]
        assert set(recorded) == set(report["models"]) and all(0 <= v <= 100 for v in recorded.values())
        # real questions routed through the API, each answered by a pool model
        routed = report["service"]["routed"]
        assert [r["question"] for r in routed] == cfg.questions
        assert all(r["chosen"] in report["models"] and r["answered_by"] in report["models"] and r["runner_up"] in report["models"] for r in routed)
        assert "paris" in routed[0]["answer"].lower(), routed[0]
        for part in ("id", "ood"):
            ev = report["evaluation"]
            assert all(0 <= ev[m][part] <= ev["oracle"][part] + 1e-9 for m in ("icl-router", *report["models"]))
        assert (out / "demo.png").stat().st_size > 10_000 and "Real questions routed through the service" in (out / "report.md").read_text()
        assert set(report["seconds"]) >= {"models", "dataset", "embed", "anchors", "train", "evaluate", "serve", "total"}
        # the README's Python API example, on the demo's router directory
        from icl_router import Router
        from icl_router.data.dataset import Dataset
        from icl_router.routing.register import anchor_profiles

        router = Router.load(out / "router")
        assert router.decision is not None and sorted(router.models) == sorted(pool)
        decisions = router.route(["What is 17 + 25?", "Spell the word garden backwards."], tasks=["gsm8k", None])
        assert all(d.model in pool for d in decisions) and router.scores(["What is 17 + 25?"]).shape == (1, len(pool))
        router.remove("gemma-3-270m")
        profile = anchor_profiles(Dataset(out / "onboarding"), ["gemma-3-270m"], meta.anchor_query_ids)["gemma-3-270m"]
        router.register("gemma-3-270m", profile, cost=0.0002)
        assert sorted(router.models) == sorted(pool)

