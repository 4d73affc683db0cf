"""The in-process API on a small router directory (no Ray): load, score, route, register."""

from __future__ import annotations

import numpy as np
import pytest
import torch

K = 6


@pytest.fixture
def router_dir(tmp_path, tiny_router_lm):
    from icl_router.data.embedder import BUNDLED
    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.router_dir import RouterMeta, save_router_dir
    from icl_router.routing.decision import DecisionParams

    lm, tok = tiny_router_lm
    layout = PromptLayout(tok, query_input="vector", profile_layout="pairs")
    torch.manual_seed(0)
    anchors = [f"a{i}" for i in range(K)]
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(K, 384), anchor_evidence=True).eval()
    meta = RouterMeta(BUNDLED, 384, "vector", "pairs", layout.placeholder_id, layout.yes_id, layout.no_id, anchors, anchor_evidence=True,
                      decision=DecisionParams(tau=0.1, prior_weight=1.0, min_gain=0.05, fitted={"models": ["strong", "weak"]}).to_json())
    pool = {"strong": np.array([1, 1, 1, 1, 0, 1], bool), "weak": np.array([0, 0, 1, 0, 0, 0], bool)}
    return save_router_dir(router, tmp_path / "router", meta=meta, pool=pool)


def test_load_route_score_and_register(router_dir):
    from icl_router import Router
    from icl_router.api import RouterError

    r = Router.load(router_dir)
    assert r.models == ["strong", "weak"] and r.decision.min_gain == pytest.approx(0.05)
    texts = ["What is 17 * 23?", "Name the capital of France."]
    p = r.scores(texts)
    assert p.shape == (2, 2) and ((p > 0) & (p < 1)).all()
    decisions = r.route(texts)
    assert [d.model for d in decisions] == ["strong", "strong"]  # random anchors: no evidence near, the guard keeps the best prior
    assert all(d.default == "strong" and d.order[0] == d.model for d in decisions)
    assert r.route(texts, min_gain=1.0, default_model="weak")[0].model == "weak"  # per-call overrides of the decision layer
    r.register("new", np.ones(K, bool), cost=0.5)
    assert r.models == ["strong", "weak", "new"] and r.route(texts)[0].default == "new"  # the default follows the profiles
    assert r.decision.fitted["guard"]["models"] == 3  # ... and the guard's margin was refitted for this pool
    r.remove("new")
    assert r.decision.min_gain == pytest.approx(0.05) and "guard" not in r.decision.fitted  # back to the pool it was fitted on
    r.register("new", np.ones(K, bool), cost=0.5)
    assert r.route(texts, models=["weak"])[0].model == "weak"
    with pytest.raises(RouterError, match="no cost for models"):
        r.route(texts, policy="cost", cost_weight=1.0)
    r.costs.update(strong=2.0, weak=0.1)
    assert r.route(texts, policy="cost", cost_weight=10.0, min_gain=0.0)[0].model == "weak"  # dear models cost too much
    for bad, match in [
        (lambda: r.register("x", np.ones(K + 1, bool)), "must be 6 booleans"),
        (lambda: r.register("x", np.ones(K, bool), cost=-1.0), "cost of 'x' must be >= 0"),
        (lambda: r.route("one string"), "texts must be a list of strings"),
        (lambda: r.route(texts, models=["gpt-9"]), r"models: \['gpt-9'\] not in the pool"),
        (lambda: r.route(texts, min_gain=2.0), "decision.min_gain must be a number"),
        (lambda: r.route(texts, policy="cheapest"), "policy kind 'cheapest' is unknown"),
        (lambda: r.remove("gpt-9"), "'gpt-9' is not registered"),
    ]:
        with pytest.raises(RouterError, match=match):
            bad()


def test_cli_route_prints_decisions_and_refuses_bad_values_in_one_line(router_dir, capsys):
    import json

    from icl_router.cli import main

    main(["route", "--router", str(router_dir), "--text", "What is 2+2?", "--min-gain", "1.0", "--default-model", "weak"])
    out = json.loads(capsys.readouterr().out)
    assert out[0]["model"] == "weak" == out[0]["default"] and set(out[0]["p"]) == {"strong", "weak"}
    for args, field in ((["--min-gain", "2"], "decision.min_gain"), (["--policy", "cost"], "cost_weight"), (["--model", "gpt-9"], "models")):
        with pytest.raises(SystemExit) as e:
            main(["route", "--router", str(router_dir), "--text", "hi", *args])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icl-router")]
        assert e.value.code == 2 and len(err) == 1 and field in err[0], err


@pytest.fixture
def task_router_dir(router_dir):
    """``router_dir`` with anchors.parquet (tasks 'math' x3, 'geo' x3), a 'geo' expert in the pool and a
    task layer that follows the same-task rate, while the plain layer never leaves the default."""
    import pyarrow as pa

    from icl_router import schemas as S
    from icl_router.model.router_dir import load_router_dir, save_router_dir, write_anchor_queries
    from icl_router.routing.decision import DecisionParams

    loaded = load_router_dir(router_dir)
    models = ["strong", "weak", "geo"]
    task = DecisionParams(tau=0.1, min_gain=0.0, task_weight=1.0, task_tau=10.0)  # tau 10: the task's anchors weigh alike
    loaded.meta.decision = DecisionParams(tau=0.1, min_gain=1.0, fitted={"models": models}, task=task).to_json()
    pool = {**loaded.pool, "geo": np.array([0, 0, 0, 1, 1, 1], bool)}
    save_router_dir(loaded.router, router_dir, meta=loaded.meta, pool=pool)
    ids = loaded.meta.anchor_query_ids
    write_anchor_queries(router_dir, pa.table({S.QUERY_ID: ids, S.POSITION: pa.array(range(K), pa.int32()), S.TEXT: ids,
                                              S.TASK: ["math"] * 3 + ["geo"] * 3, S.GOLD: ["1"] * K, S.GRADER: ["exact"] * K}))
    return router_dir


def test_queries_naming_their_task_get_the_task_layer(task_router_dir, capsys):
    import json

    from icl_router import Router
    from icl_router.api import RouterError
    from icl_router.cli import main

    r = Router.load(task_router_dir)
    texts = ["Which river crosses Paris?", "What is 17 * 23?"]
    assert [d.model for d in r.route(texts)] == ["strong", "strong"]  # no task named: the plain layer keeps the default
    assert [d.model for d in r.route(texts, tasks=["geo", None])] == ["geo", "strong"]
    assert [d.model for d in r.route(texts, tasks=["history", "geo"])] == ["strong", "geo"]  # a task no anchor has: the plain layer
    p = r.scores(texts, tasks=["geo", "math"])
    assert p[0].argmax() == 2 and p[1].argmax() == 0 and r.scores_and_mass(texts, tasks=["geo", None]).task_rows.tolist() == [True, False]
    for bad in (["geo"], "geo", [3, None]):
        with pytest.raises(RouterError, match="tasks must name one task"):
            r.route(texts, tasks=bad)
    main(["route", "--router", str(task_router_dir), "--text", texts[0], "--text", texts[1], "--task", "geo"])
    assert [d["model"] for d in json.loads(capsys.readouterr().out)] == ["geo", "geo"]  # one --task for every --text
    with pytest.raises(SystemExit) as e:
        main(["route", "--router", str(task_router_dir), "--text", "hi", "--task", "geo", "--task", "math"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icl-router")]
    assert e.value.code == 2 and len(err) == 1 and "--task" in err[0], err


def test_a_stored_default_routes_until_the_pool_loses_it(router_dir):
    """A layer whose fit chose 'weak' as the default (the best on its held-out queries, though 'strong' leads
    on the anchors): the service routes to it; when 'weak' leaves the pool the guard falls back to the
    best prior instead of refusing, and takes it up again when 'weak' returns."""
    from icl_router import Router
    from icl_router.model.router_dir import write_decision
    from icl_router.routing.decision import DecisionParams, with_default

    stored = with_default(DecisionParams(tau=0.1, prior_weight=1.0, min_gain=1.0, fitted={"models": ["strong", "weak"]}), "weak")
    write_decision(router_dir, stored.to_json())
    weak = np.array([0, 0, 1, 0, 0, 0], bool)  # its profile, as the fixture registered it
    r = Router.load(router_dir)
    texts = ["What is 17 * 23?", "Name the capital of France."]
    assert [(d.model, d.default) for d in r.route(texts)] == [("weak", "weak")] * 2
    r.register("new", np.array([1, 0, 1, 0, 1, 0], bool))
    assert r.decision.default_model == "weak" and r.route(texts)[0].default == "weak"  # the guard refitted, the default kept
    r.remove("weak")
    assert r.decision.default_model is None and r.decision.fitted["guard"]["models"] == 2
    assert [d.default for d in r.route(texts)] == ["strong"] * 2  # the best prior of this pool
    r.register("weak", weak)
    assert r.route(texts)[0].default == "weak"
