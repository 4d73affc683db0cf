"""Traces, explanations, the dashboard and shadow routing, without Ray: the /v1 handler behind a FastAPI
test client, with a fake pool view (the router and the pool models are coroutines), an in-memory span
exporter, and the shadow's log in a temp dir."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from icl_router.config import AuthConfig, DecisionLogConfig, ServeConfig, ShadowConfig, TracingConfig
from icl_router.routing.decision import DecisionParams
from icl_router.serving.circuits import Circuits
from icl_router.serving.failover import ROUTER, RouterScores
from icl_router.serving.registry import ModelEntry, PoolSnapshot
from icl_router.serving.traffic import Traffic

pytestmark = pytest.mark.unit

API, ADMIN = "sk-u", "sk-a"
ANCHORS = ("q0", "q1", "q2", "q3")
PROFILES = {"a": (True, True, False, True), "b": (True, False, True, False)}  # priors: a 0.75, b 0.5
RAW = {"a": 0.55, "b": 0.62}


class Metric:
    def __init__(self) -> None:
        self.calls: list = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.calls.append((value, tags))

    observe = set = inc


class Response:
    def __init__(self, model: str) -> None:
        self.model = model

    def model_dump_json(self) -> str:
        return json.dumps({"id": "x", "object": "chat.completion", "model": self.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})


class Gen:
    def __init__(self, model: str, fail: bool) -> None:
        self.model, self.fail = model, fail

    async def __anext__(self):
        if self.fail:
            raise RuntimeError("replica died")
        return Response(self.model)

    def cancel(self) -> None:
        pass


class Handle:
    def __init__(self, model: str, fail: bool = False) -> None:
        self.model, self.fail = model, fail
        self.chat = SimpleNamespace(remote=lambda req: Gen(self.model, self.fail))

    def options(self, **_):
        return self


def snapshot(decision: DecisionParams | None) -> PoolSnapshot:
    models = {m: ModelEntry(m, "ready", cost, f"LLMServer:{m}", accuracy=sum(PROFILES[m]) / 4) for m, cost in (("a", 0.01), ("b", 0.001))}
    return PoolSnapshot("e", 1, ANCHORS, models, PROFILES, decision, serving=True)


def view(*, decision: DecisionParams | None = None, fail: tuple[str, ...] = (), router_calls: list | None = None):
    async def score(text, pool, task=None, explain=False):
        if router_calls is not None:
            router_calls.append((text, task, explain))
        return RouterScores(dict(RAW), 3.2 if decision else None, {"embed": 1.0, "score": 2.0, "batch": 1}, None, False,
                            ((2, 0.91), (0, 0.8)) if explain else ())

    circuits = Circuits()
    for n in (ROUTER, "a", "b"):
        circuits.close(n)
    cfg = ServeConfig(router={"path": "/nowhere"}, pool=[], auth=AuthConfig(api_keys=[API], admin_keys=[ADMIN]))
    metrics = {k: Metric() for k in ("answers", "fallbacks", "latency", "spend", "limited", "shadow", "shadow_dropped")}
    return SimpleNamespace(
        cfg=cfg, snap=snapshot(decision), router=SimpleNamespace(score=SimpleNamespace(remote=score)), circuits=circuits, metrics=metrics,
        gate=lambda: None, limit=lambda key: None, spent=lambda key, model: None, retry_after="1",
        handle=lambda m: Handle(m, fail=m in fail), traffic=Traffic(DecisionLogConfig()),  # no decision log
    )


def client(v, *, tracing=None, shadow=None):
    from icl_router.serving.auth import Keys
    from icl_router.serving.http_io import install_error_handlers
    from icl_router.serving.v1 import V1Handler

    handler = V1Handler(v, keys=Keys.from_config(v.cfg.auth, env={}), tracing=tracing, shadow=shadow)
    handler._engine_request = staticmethod(lambda kind, body: SimpleNamespace(model_copy=lambda update: update))
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handler.chat(request)

    return TestClient(app)


def chat(c, routing=None, model="icl-router"):
    body = {"model": model, "messages": [{"role": "user", "content": "What is 17 + 25?"}], "max_tokens": 2}
    if routing is not None:
        body["routing"] = routing
    return c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API}"})


GUARDED = DecisionParams(tau=0.1, prior_weight=0.0, min_gain=0.2)  # b's gain over the default (a: best prior) is 0.07


# ---- explain ----------------------------------------------------------------------------------


def test_explain_gives_top_p_mass_nearest_anchors_layer_and_guard():
    calls: list = []
    r = chat(client(view(decision=GUARDED, router_calls=calls)), {"explain": True})
    assert r.status_code == 200, r.text
    e = json.loads(r.headers["x-icl-router-explain"])
    assert r.json()["routing_explanation"] == e
    assert calls[-1][2] is True  # the router was asked for the nearest anchors
    assert [t["model"] for t in e["top"]] == ["b", "a"] and e["top"][0]["p_raw"] == RAW["b"]
    assert e["evidence_mass"] == 3.2 and e["layer"] == "plain" and e["scored_by"] == "router"
    # b is predicted better, but by less than min_gain: the guard kept the default a
    assert e["chosen"] == "a" and e["guard"] == {"default": "a", "min_gain": 0.2, "best": "b", "gain": pytest.approx(0.07), "decided": "kept_default"}
    assert e["nearest_anchors"] == [{"id": "q2", "cos": 0.91, "outcomes": {"a": False, "b": True}},
                                    {"id": "q0", "cos": 0.8, "outcomes": {"a": True, "b": True}}]
    assert len(r.headers["x-icl-router-request-id"]) == 32


def test_without_explain_nothing_is_added_and_a_bad_value_is_a_400_naming_the_field():
    c = client(view(decision=GUARDED))
    r = chat(c)
    assert r.status_code == 200 and "x-icl-router-explain" not in r.headers and "routing_explanation" not in r.json()
    r = chat(c, {"explain": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "routing.explain"
    e = json.loads(chat(c, {"explain": True, "min_gain": 0.0}).headers["x-icl-router-explain"])
    assert e["chosen"] == "b" and e["guard"]["decided"] == "left_default"


def test_explain_without_a_decision_layer_says_no_layer_and_no_guard():
    e = json.loads(chat(client(view()), {"explain": True}).headers["x-icl-router-explain"])
    assert e["layer"] is None and e["evidence_mass"] is None and e["guard"] == {"default": None, "decided": "none"} and e["chosen"] == "b"


# ---- traces -----------------------------------------------------------------------------------


def memory_tracing():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from icl_router.serving.tracing import Tracing

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test"), provider), exporter


def test_spans_ingress_router_pool_model_carry_the_decision():
    tracing, exporter = memory_tracing()
    v = view(decision=DecisionParams(tau=0.1, min_gain=0.0), fail=("b",))  # b is chosen, fails; a answers
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = client(v, tracing=tracing).post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
                                        headers={"Authorization": f"Bearer {API}", "traceparent": parent})
    assert r.status_code == 200 and r.headers["x-icl-router-model"] == "a"
    spans = {s.name: [] for s in exporter.get_finished_spans()}
    for s in exporter.get_finished_spans():
        spans[s.name].append(s)
    (req,), (router,), models = spans["icl_router.request"], spans["icl_router.router"], spans["icl_router.model"]
    assert format(req.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"  # the caller's trace continues
    assert router.parent.span_id == req.context.span_id and all(m.parent.span_id == req.context.span_id for m in models)
    assert [(m.attributes["icl_router.model"], m.attributes["icl_router.outcome"]) for m in models] == [("b", "RuntimeError"), ("a", "ok")]
    a = req.attributes
    assert a["icl_router.chosen"] == "b" and a["icl_router.model"] == "a" and a["icl_router.route"] == "routed"
    assert a["icl_router.p.b"] == pytest.approx(0.62) and a["icl_router.layer"] == "plain" and a["icl_router.policy"] == "highest"
    assert a["icl_router.fallback"] == "b:error" and a["http.status_code"] == 200 and a["icl_router.request_id"] == r.headers["x-icl-router-request-id"]
    assert router.attributes["icl_router.router.embed_ms"] == 1.0


def test_a_refused_request_is_traced_with_its_status():
    tracing, exporter = memory_tracing()
    r = chat(client(view(), tracing=tracing), {"models": ["nope"]})
    assert r.status_code == 400
    (span,) = exporter.get_finished_spans()
    assert span.attributes["http.status_code"] == 400 and span.attributes["icl_router.error"] == "invalid_value"


def test_tracing_off_imports_no_opentelemetry_and_on_exports_over_otlp():
    from icl_router.serving.tracing import Tracing

    code = ("import sys; from icl_router.config import TracingConfig; from icl_router.serving.tracing import Tracing; "
            "t = Tracing.from_config(TracingConfig()); \nwith t.span('x') as s: s.set_attribute('a', 1)\n"
            "print(t.on, any(m.startswith('opentelemetry') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    t = Tracing.from_config(TracingConfig(otlp_endpoint="http://127.0.0.1:9/v1/traces"))
    assert t.on
    t.shutdown()
    with pytest.raises(ValueError, match="sample_ratio"):
        ServeConfig(router={"path": "/x"}, pool=[], tracing={"sample_ratio": 2})


# ---- the dashboard ---------------------------------------------------------------------------


METRICS_TEXT = """
# TYPE ray_icl_router_answers_total counter
ray_icl_router_answers_total{model="a",route="routed",status="ok",replica="r1"} 3.0
ray_icl_router_answers_total{model="b",route="direct",status="ok",replica="r1"} 1.0
ray_icl_router_answers_total{model="b",route="routed",status="unavailable",replica="r1"} 5.0
# TYPE ray_icl_router_requests_total counter
ray_icl_router_requests_total{code="200",error=""} 4.0
ray_icl_router_requests_total{code="400",error="invalid_value"} 2.0
ray_icl_router_requests_total{code="503",error="not_ready"} 1.0
# TYPE ray_icl_router_open_circuits gauge
ray_icl_router_open_circuits{replica="r1"} 1.0
ray_icl_router_open_circuits{replica="r2"} 0.0
# TYPE ray_icl_router_request_latency_ms histogram
ray_icl_router_request_latency_ms_bucket{route="routed",le="50.0"} 1.0
ray_icl_router_request_latency_ms_bucket{route="routed",le="100.0"} 3.0
ray_icl_router_request_latency_ms_bucket{route="routed",le="+Inf"} 3.0
ray_icl_router_request_latency_ms_count{route="routed"} 3.0
ray_icl_router_request_latency_ms_sum{route="routed"} 200.0
# TYPE ray_icl_router_prior_accuracy gauge
ray_icl_router_prior_accuracy{model="a"} 0.5
# TYPE ray_icl_router_outcomes_total counter
ray_icl_router_outcomes_total{model="a",source="feedback"} 4.0
# TYPE ray_icl_router_outcome_score_total counter
ray_icl_router_outcome_score_total{model="a",source="feedback"} 3.0
# TYPE ray_icl_router_spend_total counter
ray_icl_router_spend_total{key="team-a",model="a"} 0.03
"""


def test_the_committed_grafana_dashboard_is_the_generated_one_and_names_every_panel_metric():
    from icl_router.serving.dashboard import PANELS, grafana_dashboard, metric_names

    path = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "icl-router.json"
    assert json.loads(path.read_text()) == grafana_dashboard(), "regenerate: python -m icl_router.serving.dashboard > cluster/grafana/icl-router.json"
    assert [p.title for p in PANELS] == ["Traffic share per model", "Routed vs direct latency", "Responses: 2xx / 4xx / 5xx", "Open circuits",
                                         "Outcome accuracy per model", "Spend per key"]
    assert metric_names() == sorted(f"ray_icl_router_{n}" for n in ("answers_total", "request_latency_ms_bucket", "requests_total", "open_circuits",
                                                                    "outcome_score_total", "outcomes_total", "prior_accuracy", "spend_total"))


def test_the_status_page_shows_each_panel_from_the_metrics_text():
    from icl_router.serving.dashboard import PANELS, panel_values, parse, render

    v = panel_values(parse(METRICS_TEXT))
    assert v["traffic"] == {"a": {"share": 0.75, "answers": 3.0}, "b": {"share": 0.25, "answers": 1.0}}
    assert v["status"] == {"2xx": 4.0, "4xx": 2.0, "5xx": 1.0} and v["circuits"] == 1.0
    assert v["latency"]["routed"]["p50"] == pytest.approx(62.5)  # rank 1.5 of 3: 50 + 50 * (1.5 - 1) / (3 - 1)
    assert v["accuracy"] == {"a": {"outcomes": 0.75, "n": 4.0, "anchors": 0.5}} and v["spend"] == {"team-a": 0.03}
    page = render(v)
    assert all(f'id="{p.key}"' in page for p in PANELS) and "<script" not in page and "75% (3)" in page


# ---- shadow routing ----------------------------------------------------------------------------


def shadow(tmp_path, *, handle=None, decision=None, extra=None, costs=None, **cfg):
    from icl_router.routing.policy import Policy
    from icl_router.serving.shadow import Shadow

    sc = ShadowConfig(log_dir=str(tmp_path / "shadow"), flush_s=0.05, **cfg)
    return Shadow(sc, live_policy=Policy(), handle=handle, decision=decision, extra=extra or {}, extra_costs=costs or {}, router_timeout_s=1.0,
                  metrics={"shadow": Metric(), "shadow_dropped": Metric()})


def shadow_rows(c, sh) -> list[dict]:
    asyncio.run(sh.drain()) if sh.log.rows or sh.tasks else None
    files = sorted(Path(sh.log.dir).glob("part-*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_a_policy_candidate_re_decides_on_the_live_scores_and_is_logged_not_served(tmp_path):
    sh = shadow(tmp_path, policy={"kind": "cost", "cost_weight": 100.0}, name="cheap")
    v = view()
    c = client(v, shadow=sh)
    out = []

    async def go():  # the handler and the shadow's tasks on one loop, as in a replica
        import httpx

        transport = httpx.ASGITransport(app=c.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            for _ in range(3):
                r = await ac.post("/v1/chat/completions", json={"model": "icl-router", "messages": [{"role": "user", "content": "hi"}]},
                                  headers={"Authorization": f"Bearer {API}"})
                out.append(r)
        await sh.drain()

    asyncio.run(go())
    assert all(r.status_code == 200 and r.headers["x-icl-router-model"] == "b" for r in out)  # served: the live pick
    rows = [r for f in sorted((tmp_path / "shadow").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 3 and {r["request_id"] for r in rows} == {r.headers["x-icl-router-request-id"] for r in out}
    row = rows[0]
    # cost: 0.62 - 100 * 0.001 = 0.52 (b) beats 0.55 - 100 * 0.01 = -0.45 (a): the same pick here
    assert row["candidate"] == "cheap" and row["live_model"] == "b" and row["shadow_model"] == "b" and row["agree"] is True
    assert row["shadow_scored_by"] == "live" and row["predicted_gain"] == 0.0 and row["served_model"] == "b"
    assert sh.metrics["shadow"].calls and sh.metrics["shadow"].calls[0][1] == {"candidate": "cheap", "agree": "true"}


def test_a_candidate_with_an_unserved_model_routes_to_it_in_the_log(tmp_path):
    calls = []

    async def score(text, pool, task=None, explain=False):
        calls.append(pool)
        return RouterScores({**RAW, "new": 0.9}, None, {})

    sh = shadow(tmp_path, handle=SimpleNamespace(score=SimpleNamespace(remote=score)), extra={"new": [True, True, True, False]},
                costs={"new": 0.002}, pool=[{"name": "new", "profile": [True, True, True, False], "cost": 0.002}])
    v = view()
    snap = v.snap
    from icl_router.routing.policy import Policy, choose
    from icl_router.serving.failover import Plan

    live = Plan(choose(dict(RAW), policy=Policy()), "router", [], 1.0, {}, raw_p=dict(RAW))
    row = asyncio.run(sh.decide(text="q", task=None, live=live, snap=snap, candidates=["a", "b"], request_id="r1", served_model="b"))
    assert calls == [("e", 1)] and row["shadow_model"] == "new" and row["live_model"] == "b" and row["agree"] is False
    assert row["predicted_gain"] == pytest.approx(0.9 - 0.62) and json.loads(row["shadow_p"])["new"] == 0.9

    async def down(text, pool, task=None, explain=False):
        raise RuntimeError("shadow router died")

    sh.handle = SimpleNamespace(score=SimpleNamespace(remote=down))
    row = asyncio.run(sh.decide(text="q", task=None, live=live, snap=snap, candidates=["a", "b"], request_id="r2", served_model="b"))
    assert row["shadow_model"] is None and row["shadow_error"] == "router:error"


def test_an_unwritable_log_dir_drops_rows_counts_them_and_warns_once(tmp_path, caplog):
    from icl_router.serving.shadow import ShadowLog

    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    dropped = Metric()
    log = ShadowLog(blocker / "sub", flush_rows=1, flush_s=1, max_files=2, dropped=dropped)
    for _ in range(2):
        log.add({"request_id": "x"})
        assert log.flush() == 0
    assert [c[0] for c in dropped.calls] == [1, 1] and sum("cannot write" in r.message for r in caplog.records) <= 1
    ok = ShadowLog(tmp_path / "ok", flush_rows=1, flush_s=1, max_files=2)
    for i in range(4):
        ok.add({"request_id": str(i)})
        ok.flush()
    assert len(list((tmp_path / "ok").glob("part-*.parquet"))) == 2  # bounded: the oldest removed


def test_shadow_config_names_the_bad_field():
    with pytest.raises(ValueError, match="exactly one of profile"):
        ServeConfig(router={"path": "/x"}, pool=[], shadow={"pool": [{"name": "m"}]})
    with pytest.raises(ValueError, match="served in pool"):
        ServeConfig(router={"path": "/x"}, pool=[{"name": "m", "path": "/m"}], shadow={"pool": [{"name": "m", "profile": [True]}]})
    with pytest.raises(ValueError, match="sample"):
        ServeConfig(router={"path": "/x"}, pool=[], shadow={"sample": 0})


def test_shadow_report_agreement_predicted_and_realised_gain(tmp_path, capsys):
    import pyarrow as pa

    from icl_router.cli import main
    from icl_router.serving.shadow import SHADOW_SCHEMA, ShadowLog

    log = ShadowLog(tmp_path / "log", flush_rows=10, flush_s=1, max_files=10)
    base = {"time": 0, "candidate": "c", "task": None, "served_model": None, "live_policy": "highest", "shadow_policy": "highest",
            "shadow_scored_by": "router", "shadow_error": None}
    for i, (live, sh, gain) in enumerate([("a", "a", 0.0), ("a", "new", 0.2), ("b", "new", 0.1), ("a", None, None)]):
        log.add({**base, "request_id": f"r{i}", "query_hash": f"h{i}", "live_model": live, "shadow_model": sh, "agree": None if sh is None else live == sh,
                 "predicted_gain": gain, "live_p": json.dumps({"a": 0.6, "b": 0.5}), "shadow_p": "{}"})
    log.flush()
    # outcomes: r0 known for a (agree: enough); r1 both known (new right, a wrong); r2 only b known (not counted)
    out = tmp_path / "outcomes"
    out.mkdir()
    pq.write_table(pa.table({"query_id": ["r0", "h1", "r1"], "model_id": ["a", "a", "new"], "correct": [True, False, True]}), out / "part-0.parquet")
    # feedback-shaped rows (request_id, model, one of correct / score)
    pq.write_table(pa.table({"request_id": ["r2"], "model": ["b"], "correct": [True], "score": pa.array([None], pa.float64())}), out / "fb.parquet")
    main(["shadow-report", "--log", str(tmp_path / "log"), "--outcomes", str(out), "--output", str(tmp_path / "rep")])
    got = json.loads(capsys.readouterr().out)["candidates"]["c"]
    assert got["rows"] == 4 and got["decided"] == 3 and got["errors"] == 1
    assert got["agreement"] == pytest.approx(1 / 3) and got["predicted_gain"] == pytest.approx(0.1)
    assert got["live_view_gain"] == 0.0  # only the agreeing row: "new" is not in the live pool
    assert got["realised"] == {"rows": 2, "live_accuracy": 0.5, "shadow_accuracy": 1.0, "gain": 0.5}
    assert got["switches"] == {"a -> new": 1, "b -> new": 1}
    assert "| c | 4 | 3 | 33.3 |" in (tmp_path / "rep" / "shadow_report.md").read_text()
    assert SHADOW_SCHEMA.names[0] == "request_id"
    with pytest.raises(SystemExit):
        main(["shadow-report", "--log", str(tmp_path / "nothing")])
    assert "--log" in capsys.readouterr().err
