"""The routing service end to end: Ray Serve + ray.serve.llm (real vLLM on CPU), driven by the real
`openai` client, plain HTTP and schemathesis over loopback.

One app serves the module (its start dominates the time): a tiny router directory with random
weights (routing quality is not the point: the plumbing is) and a decision layer, whose profiles
cover tiny-a only, and two tiny vLLM models, tiny-a and tiny-b (icl_router.testing.tiny_serve_config). tiny-b is served
by name until the onboarding test registers its profile, so the tests run in file order; the
traffic test (the decision log re-profiled through the service moves the routing) comes after the
metrics test, and the test that kills replicas is the last.

Every response of the ingress that a test receives is counted here (``SENT``), so the service's
own counter ``icl_router_requests_total`` can be checked against it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from icl_router.testing import TINY_POOL, TINY_TEXTS, tiny_profile

pytestmark = pytest.mark.vllm

API_KEY, ADMIN_KEY = "sk-test-user", "sk-test-admin"
K = 8
COSTS = TINY_POOL
QUERY = TINY_TEXTS[0]
PROFILE_A = tiny_profile(K)  # the router directory's profile of tiny-a
PROFILE_B = [True, False] * (K // 2)  # registered by the onboarding test
SENT: collections.Counter = collections.Counter()  # HTTP status -> responses of the ingress received by this module
SHADOW_MODEL = "tiny-new"  # in the shadow candidate's pool only: never served


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: keeps every exported span (name, attributes, ids)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans = self.spans = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                req = ExportTraceServiceRequest()
                req.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in sp.attributes}
                            spans.append({"name": sp.name, "trace": sp.trace_id.hex(), "id": sp.span_id.hex(), "parent": sp.parent_span_id.hex(),
                                          "attrs": attrs})
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _record(status: int, body: bytes) -> None:
    """Count a response if the ingress sent it (JSON); the Serve proxy's own answers before the app is up are text."""
    try:
        ours = isinstance(json.loads(body or b"{}"), dict) if status >= 400 else True
    except ValueError:
        ours = False
    if ours:
        SENT[status] += 1


@dataclass
class Service:
    url: str  # .../v1
    metrics: str
    root: Path
    startup: list  # (status, headers, error code, ms) of chat requests sent before /ready answered 200
    otlp: OtlpReceiver  # the spans the service exported

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")


@pytest.fixture(scope="module")
def service():
    """The app on free loopback ports, everything under one temp dir. While it starts, a chat request
    is sent each time /ready answers (not 200): what the client sees before ready is kept."""

    from icl_router.config import (
        AuthConfig,
        AutoscalingConfig,
        DecisionLogConfig,
        RayConfig,
        ScorerServeConfig,
        ShadowConfig,
        TracingConfig,
    )
    from icl_router.routing.decision import DecisionParams
    from icl_router.serving.app import free_port, start
    from icl_router.testing import make_tiny_router_dir, pool_diagnosis, served_root, tiny_serve_config

    SENT.clear()
    metrics_port = free_port()
    otlp = OtlpReceiver()
    with served_root("srv-", num_cpus=10, _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000}) as root:
        # a decision layer that leaves p as it is and guards the default only at a tie: requests override it;
        # its task layer (for queries naming the anchors' task) routes on the same-task rates, the anchors weighing alike
        task = DecisionParams(tau=0.1, prior_weight=0.0, min_gain=0.0, task_weight=1.0, task_tau=10.0)
        decision = DecisionParams(tau=0.1, prior_weight=0.0, min_gain=0.0, task=task).to_json()
        fast = dict(upscale_delay_s=1, downscale_delay_s=4, metrics_interval_s=0.5, look_back_period_s=2)
        router = ScorerServeConfig(
            path=str(make_tiny_router_dir(root / "router", k=K, decision=decision)), num_cpus=1,
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=0.5, **fast),
        )
        cfg = tiny_serve_config(
            root, router=router,
            auth=AuthConfig(api_keys=[API_KEY], admin_keys=[ADMIN_KEY]),
            port=free_port(),
            first_output_timeout_s=10,
            router_timeout_s=5,
            deploy_timeout_s=20,  # only the broken registration deploys here: it fails by this deadline
            max_prompt_chars=2000,
            max_body_bytes=262144,  # the hostile-input test's 100,000 nested brackets fit; its 30 MB do not
            persist_profiles=True,  # onboarded profiles survive the registry replica's restart (the chaos test)
            ray=RayConfig(num_cpus=10),
            tracing=TracingConfig(otlp_endpoint=otlp.url, export_interval_s=0.5),
            # a candidate beside the live router: the same directory, and a model the service does not serve
            shadow=ShadowConfig(name="with-new", pool=[{"name": SHADOW_MODEL, "profile": [True] * K, "cost": 0.0}],
                                log_dir=str(root / "shadow"), flush_s=1.0),
            # feedback feeds the outcome panel; the traffic test re-profiles the logged text, its task graded as exact_match
            decision_log=DecisionLogConfig(dir=str(root / "log"), flush_interval_s=1.0, log_text=True, graders={"qa": "exact_match"}),
        )
        t0 = time.monotonic()
        url = start(cfg)
        base, startup = url.removesuffix("/v1"), []
        chat = {"model": "icl-router", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 2}
        while time.monotonic() - t0 < 900:  # a bounded wait: ends when /ready answers 200
            status, _, _ = _http(base + "/ready")
            if status == 200:
                break
            if status == 503:  # the ingress is up, the pool is not: what does a request get?
                t1 = time.perf_counter()
                got, headers, body = _http(url + "/chat/completions", method="POST", body=chat, key=API_KEY)
                startup.append((got, headers, body.get("error", {}).get("code"), (time.perf_counter() - t1) * 1e3))
            time.sleep(0.5)
        print(f"service ready in {time.monotonic() - t0:.0f} s at {url}; {len(startup)} requests sent before")
        # /ready needs the router and one pool model; the tests need both models: a bounded wait for the other
        circuits = {}
        while time.monotonic() - t0 < 900:
            circuits = {r["id"]: r["circuit"] for r in _http(base + "/admin/models", key=ADMIN_KEY)[2].get("data", [])}
            if set(circuits) == set(COSTS) and set(circuits.values()) == {"closed"}:
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"the pool's circuits never all closed within 900 s: {circuits}\n{pool_diagnosis(root)}")
        print(f"every pool model answers after {time.monotonic() - t0:.0f} s")
        yield Service(url, f"http://127.0.0.1:{metrics_port}/metrics", root, startup, otlp)
    otlp.close()


def _openai(base_url: str, key: str):
    import httpx
    import openai

    def hook(response: httpx.Response) -> None:
        if response.status_code >= 400:
            response.read()
        _record(response.status_code, response.content if response.status_code >= 400 else b"")

    http = httpx.Client(event_hooks={"response": [hook]}, timeout=60)
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=60, max_retries=0, http_client=http)


@pytest.fixture(scope="module")
def client(service):
    return _openai(service.url, API_KEY)


def _http(url: str, *, method: str = "GET", body: bytes | dict | None = None, key: str | None = None,
          content_type: str | None = "application/json") -> tuple[int, dict, dict]:
    """(status, headers, JSON body or {}) without raising on 4xx/5xx; counts the ingress's responses."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method)
    if content_type:
        req.add_header("content-type", content_type)
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, ConnectionError):  # nothing listening yet
        return 0, {}, {}
    headers = {k.lower(): v for k, v in headers.items()}
    _record(status, raw)
    try:
        out = json.loads(raw)
    except ValueError:
        out = {}
    return status, headers, out if isinstance(out, dict) else {}


def _declared_body(url: str, size: int) -> tuple[int, dict]:
    """POST headers announcing a ``size``-byte JSON body and send none of it: the service must answer
    from the headers alone. (Sending the bytes would race the answer: a server that refuses a body
    unread resets the connection, and the client may lose the answer.)"""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.putrequest("POST", u.path)
        for k, v in (("Content-Type", "application/json"), ("Content-Length", str(size)), ("Authorization", f"Bearer {API_KEY}")):
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    _record(r.status, raw)
    return r.status, json.loads(raw)


def _admin(service, name: str = "") -> str:
    return service.base + "/admin/models" + (f"/{name}" if name else "")


def _chat(client, content: str = QUERY, *, model: str = "icl-router", max_tokens: int = 4, **kw):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **kw)
    return raw.headers, raw.parse()


def _timing(headers) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=") for kv in headers["x-icl-router-timing"].split(";"))}


def _p(headers) -> dict[str, float]:
    return {m: float(v) for m, v in (kv.split("=") for kv in headers["x-icl-router-p"].split(","))}


def test_before_ready_v1_answers_503_with_retry_after_at_once(service, client):
    """While the pool loads (vLLM takes tens of seconds, the ingress a few), requests are refused at once
    with 503 not_ready and Retry-After, not held until a timeout; after /ready, they are served."""
    assert service.startup, "no request reached the ingress before it was ready"
    for status, headers, code, _ in service.startup:
        assert (status, code) == (503, "not_ready") and int(headers["retry-after"]) >= 1
    print(f"before ready: {len(service.startup)} requests, slowest answer {max(ms for *_, ms in service.startup):.1f} ms")
    assert _http(service.base + "/health")[:1] == (200,) and _http(service.base + "/ready")[2]["ready"] is True
    headers, resp = _chat(client)
    assert resp.choices and headers["x-icl-router-model"] in COSTS


@pytest.mark.timeout(600)
def test_onboarding_makes_a_served_model_routable_and_the_default_follows_the_profiles(service, client):
    status, _, listed = _http(_admin(service), key=ADMIN_KEY)
    assert status == 200 and listed["k"] == K and len(listed["anchors"]) == K and listed["router"] == "closed"
    rows = {r["id"]: r for r in listed["data"]}
    assert rows["tiny-a"]["routable"] and not rows["tiny-b"]["routable"] and rows["tiny-b"]["accuracy"] is None
    assert rows["tiny-a"]["circuit"] == rows["tiny-b"]["circuit"] == "closed" and rows["tiny-b"]["app"] is None
    headers, _ = _chat(client)
    assert _p(headers).keys() == {"tiny-a"} and headers["x-icl-router-default"] == "tiny-a"  # tiny-b is served but has no profile yet

    assert _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": PROFILE_B}, key=API_KEY)[0] == 401  # user key
    bad = _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": PROFILE_B[:-1]}, key=ADMIN_KEY)
    assert bad[0] == 400 and "K=8" in bad[2]["error"]["message"] and bad[2]["error"]["param"] == "profile"
    assert _http(_admin(service), method="POST", body={"model": "nope", "profile": PROFILE_B}, key=ADMIN_KEY)[0] == 404  # not deployed

    t0 = time.perf_counter()
    status, _, out = _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": PROFILE_B}, key=ADMIN_KEY)
    headers, resp = _chat(client, extra_body={"routing": {"models": ["tiny-b"]}})
    print(f"onboarding: POST to first routed answer {time.perf_counter() - t0:.2f} s")  # a figure, not a check
    assert status == 201 and out["accuracy"] == pytest.approx(0.5, abs=1e-9)  # a mean of booleans
    assert headers["x-icl-router-route"] == "routed" and headers["x-icl-router-model"] == "tiny-b" and resp.model == "tiny-b"
    headers, _ = _chat(client)
    assert _p(headers).keys() == {"tiny-a", "tiny-b"}  # every routed query now scores both
    assert headers["x-icl-router-default"] == "tiny-b"  # the better profile (0.5 > 0.25) is the guard's default now
    status, _, row = _http(_admin(service, "tiny-b"), key=ADMIN_KEY)
    assert status == 200 and row["routable"] and row["accuracy"] == pytest.approx(0.5, abs=1e-9) and row["state"] == "ready"
    assert _http(_admin(service, "nope"), key=ADMIN_KEY)[0] == 404
    again = _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": PROFILE_B}, key=ADMIN_KEY)
    assert again[0] == 409 and again[2]["error"]["code"] == "model_exists"


@pytest.mark.timeout(120)
def test_routed_and_pass_through_requests(service, client):
    assert [m.id for m in client.models.list()] == ["icl-router", "auto", "tiny-a", "tiny-b"]
    assert client.models.retrieve("tiny-a").id == "tiny-a" and client.models.retrieve("auto").id == "auto"
    assert _http(service.url + "/models/gpt-9", key=API_KEY)[0] == 404
    for alias in ("icl-router", "auto"):
        headers, resp = _chat(client, model=alias)
        p = _p(headers)
        assert headers["x-icl-router-route"] == "routed" and headers["x-icl-router-policy"].startswith("highest;min_gain=0.0")
        assert headers["x-icl-router-chosen"] == max(p, key=p.get) == headers["x-icl-router-model"] == resp.model
        assert all(0 < v < 1 for v in p.values()) and resp.choices[0].message.content
        assert "x-icl-router-fallback" not in headers
        timing = _timing(headers)  # where the router replica spent the time; figures, only their presence is checked
        assert timing.keys() == {"queue", "embed", "score", "batch", "cached"} and min(timing.values()) >= 0 and timing["batch"] >= 1
    for name in COSTS:
        headers, resp = _chat(client, model=name)
        assert headers["x-icl-router-route"] == "direct" and resp.model == name and "x-icl-router-p" not in headers
    raw = client.completions.with_raw_response.create(model="auto", prompt=QUERY, max_tokens=3)
    assert raw.headers["x-icl-router-model"] == raw.parse().model and raw.parse().choices[0].text is not None


@pytest.mark.timeout(120)
def test_query_embeddings_are_cached_by_exact_text(client):
    text = f"{QUERY} cache probe {time.time()}"  # new to every replica
    cached = [_timing(_chat(client, text)[0])["cached"]]
    # Up to 2 router replicas (autoscaling may add or drop one meanwhile): a few calls land on a
    # replica that has seen the text; stop at the first hit.
    while len(cached) < 8 and not cached[-1]:
        cached.append(_timing(_chat(client, text)[0])["cached"])
    assert cached[0] == 0 and cached[-1] == 1, cached
    assert _timing(_chat(client, text + "!")[0])["cached"] == 0  # exact text only


@pytest.mark.timeout(120)
def test_streaming_routed_and_direct(client):
    for model in ("icl-router", "tiny-a"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": QUERY}], max_tokens=8, stream=True
        )
        chunks = list(raw.parse())
        assert raw.headers["content-type"].startswith("text/event-stream")
        served = raw.headers["x-icl-router-model"]
        assert len(chunks) >= 2 and {c.model for c in chunks} == {served}
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.timeout(120)
def test_policies_and_the_decision_layer_per_request(client):
    import openai

    cheap, dear = "tiny-b", "tiny-a"
    cases = [  # (routing field, expected model given the p it reports)
        ({"policy": "threshold", "threshold": 0.0}, lambda p: cheap),  # every model clears 0: the cheapest
        ({"policy": "threshold", "threshold": 1.0}, lambda p: max(p, key=p.get)),  # none clears 1: the highest p
        ({"policy": "budget", "budget": 0.005}, lambda p: cheap),  # only tiny-b fits
        ({"policy": "budget", "budget": 0.0}, lambda p: cheap),  # nothing fits: the cheapest
        ({"policy": "margin", "margin": 1.0}, lambda p: cheap),
        ({"policy": "cost", "cost_weight": 1000.0}, lambda p: cheap),  # 1000 points of p per dollar: the cost decides
        ({"models": [dear]}, lambda p: dear),
        ({"min_gain": 1.0}, lambda p: "tiny-b"),  # the guard never leaves the default (the best profile)
        ({"min_gain": 1.0, "default_model": "tiny-a"}, lambda p: "tiny-a"),
    ]
    for routing, expect in cases:
        headers, resp = _chat(client, extra_body={"routing": routing})
        p = _p(headers)
        assert headers["x-icl-router-chosen"] == expect(p) == resp.model, (routing, headers)
        assert headers["x-icl-router-policy"].startswith(routing.get("policy", "highest"))
    headers, _ = _chat(client, extra_body={"routing": {"min_gain": 1.0}})
    assert headers["x-icl-router-default"] == "tiny-b" and "min_gain=1.0" in headers["x-icl-router-policy"]
    # a heavy prior weight against a query unlike every anchor: the p the choice was made on are the priors
    headers, _ = _chat(client, extra_body={"routing": {"prior_weight": 1e6}})
    assert _p(headers) == pytest.approx({"tiny-a": PROFILE_A.mean(), "tiny-b": 0.5}, abs=1e-4)
    # naming the anchors' task: the task layer routes, on each model's rate over that task's anchors
    headers, _ = _chat(client, extra_body={"routing": {"task": "arithmetic"}})
    assert "layer=task" in headers["x-icl-router-policy"] and _p(headers) == pytest.approx({"tiny-a": PROFILE_A.mean(), "tiny-b": 0.5}, abs=0.03)
    headers, _ = _chat(client, extra_body={"routing": {"task": "poetry"}})  # a task no anchor has: the plain layer
    assert "layer=task" not in headers["x-icl-router-policy"]
    for bad, param in (
        ({"policy": "threshold"}, "routing.policy"), ({"policy": "fastest"}, "routing.policy"), ({"models": ["gpt-9"]}, "routing.models"),
        ({"budget": "cheap"}, "routing.budget"), ({"min_gain": 5}, "routing.min_gain"), ({"default_model": "gpt-9"}, "routing.default_model"),
        ({"policy": "cost"}, "routing.policy"), ({"cost_weight": 1.0}, "routing.cost_weight"), ({"task": ""}, "routing.task"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, extra_body={"routing": bad})
        assert e.value.status_code == 400 and e.value.body["param"] == param and "routing" in e.value.body["message"], (bad, e.value.body)


@pytest.mark.timeout(60)
def test_keys_guard_the_api_the_admin_and_the_schema(service, client):
    import openai

    for key in ("", "sk-wrong", ADMIN_KEY):  # the admin key is not an API key
        bad = _openai(service.url, key or "x")
        if not key:
            bad = bad.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for key in (None, API_KEY):
        status, _, body = _http(_admin(service), key=key)
        assert status == 401 and body["error"]["type"] == "invalid_request_error"
    assert _http(service.base + "/openapi.json")[0] == 401  # the schema is behind a key
    status, _, schema = _http(service.base + "/openapi.json", key=API_KEY)
    assert status == 200 and "/v1/chat/completions" in schema["paths"] and "ChatBody" in schema["components"]["schemas"]
    assert _http(service.base + "/health")[0] == 200 and _http(service.base + "/ready")[0] == 200  # probes need no key
    assert client.models.list().data  # the right key still works


@pytest.mark.timeout(180)
def test_hostile_inputs_get_4xx_and_the_service_keeps_serving(service, client):
    """The issue's ten 500s, the limits, and the earlier bad inputs: each an OpenAI-shaped 4xx."""
    url, admin = service.url + "/chat/completions", _admin(service)
    msgs = [{"role": "user", "content": "hi"}]
    profile = PROFILE_B
    chats = [
        (b'{"model": "auto", "messages": ' + b"[" * 100_000, 400, "invalid_json"),  # 1: 100,000 nested [
        ({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "invalid_value"),  # 2
        (b'{"model": "auto", "messages": [', 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        ({"model": "gpt-9", "messages": msgs}, 404, "model_not_found"),
        ({"model": "auto", "messages": []}, 400, "invalid_value"),
        ({"model": "auto", "messages": [{"role": "user", "content": "  "}]}, 400, "invalid_value"),
        ({"model": "auto", "messages": [{"role": "user", "content": "x" * 2001}]}, 400, "context_length_exceeded"),
        ({"model": "auto", "messages": "hi"}, 400, "invalid_value"),
        ({"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
        ({"model": 7, "messages": msgs}, 400, "invalid_value"),
        ({"model": "auto", "messages": msgs, "stream": "yes"}, 400, "invalid_value"),
        ({"model": "auto", "messages": msgs, "max_tokens": "ten"}, 400, "invalid_value"),
        ({"model": "tiny-a", "messages": msgs, "temperature": "hot"}, 400, "invalid_value"),
        ({"model": "tiny-a", "messages": msgs, "n": 10_000}, 400, "invalid_value"),
        ({"messages": msgs}, 400, "invalid_value"),
    ]
    for body, status, code in chats:
        got, _, err = _http(url, method="POST", body=body, key=API_KEY)
        assert (got, err.get("error", {}).get("code")) == (status, code), (str(body)[:80], err)
        assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    cases = [
        (service.url + "/completions", {"model": "auto", "prompt": ["q"] * 2000}, API_KEY, 400, "invalid_value"),  # 3: 2,000 prompts
        (service.url + "/completions", {"model": "auto", "prompt": ""}, API_KEY, 400, "invalid_value"),
        # 4-9: the admin `serving` block, checked before anything is deployed
        (admin, {"model": "m-x", "profile": profile, "serving": {}}, ADMIN_KEY, 400, "invalid_value"),
        (admin, {"model": "m-x", "profile": profile, "serving": {"path": "/tmp", "colour": "red"}}, ADMIN_KEY, 400, "invalid_value"),
        (admin, {"model": "m-x", "profile": profile, "serving": {"path": "/tmp", "engine_kwargs": 5}}, ADMIN_KEY, 400, "invalid_value"),
        (admin, {"model": "m-x", "profile": profile, "serving": {"path": "/tmp", "accelerator_type": "H100"}}, ADMIN_KEY, 400, "invalid_value"),
        (admin, {"model": "auto", "profile": profile, "serving": {"path": "/tmp"}}, ADMIN_KEY, 400, "invalid_value"),
        (admin, {"model": "m-x", "profile": profile, "serving": {"path": "/tmp", "name": "m-y"}}, ADMIN_KEY, 400, "invalid_value"),
    ]
    for u, body, key, status, code in cases:
        got, _, err = _http(u, method="POST", body=body, key=key)
        assert (got, err.get("error", {}).get("code")) == (status, code), (str(body)[:80], err)
    # 10: the limits: a 30 MB body (413 on its Content-Length, before a byte of it is read), text/plain (415)
    got, err = _declared_body(url, 30 * 2**20)
    assert (got, err["error"]["code"]) == (413, "request_too_large")
    got, _, err = _http(url, method="POST", body={"model": "auto", "messages": msgs}, key=API_KEY, content_type="text/plain")
    assert (got, err["error"]["code"]) == (415, "unsupported_media_type")
    # a prompt over the model's own context (512 tokens) but under the char limit: vLLM's 400, passed on
    got, _, err = _http(url, method="POST", body={"model": "tiny-a", "messages": [{"role": "user", "content": "7 " * 900}]}, key=API_KEY)
    assert got == 400 and "maximum context length" in err["error"]["message"], err
    assert _http(service.url + "/nowhere", key=API_KEY)[0] == 404
    assert _http(service.url + "/models", method="DELETE", key=API_KEY)[0] == 405
    status, _, rows = _http(admin, key=ADMIN_KEY)  # nothing was deployed by the refused registrations
    assert status == 200 and {r["id"] for r in rows["data"]} == set(COSTS)
    headers, resp = _chat(client)
    assert resp.choices and headers["x-icl-router-model"] in COSTS


@pytest.mark.timeout(420)
def test_a_registration_that_cannot_deploy_fails_by_its_deadline_and_can_be_retried_or_deleted(service):
    """A directory that passes the path check (a config.json vLLM CPU takes) but holds no weights: the
    deployment never runs; by deploy_timeout_s the registration has failed with the reason and its app is
    torn down; a retry is accepted; DELETE cancels it."""
    empty = service.root / "not-a-model"
    empty.mkdir(exist_ok=True)
    (empty / "config.json").write_text((service.root / "tiny-a" / "config.json").read_text())
    body = {"model": "broken", "profile": PROFILE_B, "serving": {"path": str(empty), "engine_kwargs": {"max_model_len": 256}}}
    status, _, out = _http(_admin(service), method="POST", body=body, key=ADMIN_KEY)
    assert status == 202 and out["state"] == "deploying"
    again = _http(_admin(service), method="POST", body=body, key=ADMIN_KEY)
    assert again[0] == 409 and again[2]["error"]["code"] == "deployment_in_progress"
    t0, row = time.monotonic(), {}
    while time.monotonic() - t0 < 300:  # a bounded wait: deploy_timeout_s is 20 s
        row = _http(_admin(service, "broken"), key=ADMIN_KEY)[2]
        if row.get("state") != "deploying":
            break
        time.sleep(2)
    print(f"failed deployment: {row.get('state')} after {time.monotonic() - t0:.0f} s: {row.get('error')}")
    assert row["state"] == "failed" and row["error"] and not row["routable"]
    assert _http(service.url + "/models/broken", key=API_KEY)[0] == 404  # never served
    from ray import serve

    assert "pool-broken" not in serve.status().applications  # torn down
    status, _, out = _http(_admin(service), method="POST", body=body, key=ADMIN_KEY)  # the retry is accepted
    assert status == 202 and out["state"] == "deploying"
    status, _, out = _http(_admin(service, "broken"), method="DELETE", key=ADMIN_KEY)  # and cancelled
    assert status == 200 and out == {"model": "broken", "deleted": "model", "torn_down": "pool-broken"}
    assert _http(_admin(service, "broken"), key=ADMIN_KEY)[0] == 404 and "pool-broken" not in serve.status().applications
    assert _http(_admin(service, "broken"), method="DELETE", key=ADMIN_KEY)[0] == 404


@pytest.mark.timeout(120)
def test_delete_unregisters_a_config_pool_model_and_it_can_come_back(service, client):
    status, _, out = _http(_admin(service, "tiny-b"), method="DELETE", key=ADMIN_KEY)
    assert status == 200 and out == {"model": "tiny-b", "deleted": "profile", "torn_down": None}
    headers, _ = _chat(client)
    assert _p(headers).keys() == {"tiny-a"} and _chat(client, model="tiny-b")[1].model == "tiny-b"  # still served by name
    assert _http(_admin(service, "tiny-b"), method="DELETE", key=ADMIN_KEY)[2]["error"]["code"] == "model_in_config"
    assert _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": PROFILE_B}, key=ADMIN_KEY)[0] == 201
    assert _p(_chat(client)[0]).keys() == {"tiny-a", "tiny-b"}


# ---- why this model, traces, shadow routing -------------------------------------------------------


@pytest.mark.timeout(180)
def test_explain_says_why_and_the_spans_carry_the_decision(service, client):
    raw = client.chat.completions.with_raw_response.create(model="icl-router", messages=[{"role": "user", "content": QUERY}], max_tokens=2,
                                                           extra_body={"routing": {"explain": True}})
    e = json.loads(raw.headers["x-icl-router-explain"])
    assert raw.http_response.json()["routing_explanation"] == e and raw.parse().choices
    anchors = _http(_admin(service), key=ADMIN_KEY)[2]["anchors"]
    assert {t["model"] for t in e["top"]} == {"tiny-a", "tiny-b"} and e["chosen"] == raw.headers["x-icl-router-chosen"]
    assert e["evidence_mass"] >= 0 and e["layer"] == "plain" and e["scored_by"] == "router"
    assert e["guard"]["default"] == "tiny-b" and e["guard"]["decided"] in ("default_is_best", "kept_default", "left_default")
    near = e["nearest_anchors"]
    assert len(near) == 5 and all(a["id"] in anchors and a["outcomes"].keys() == {"tiny-a", "tiny-b"} for a in near)
    assert [a["cos"] for a in near] == sorted((a["cos"] for a in near), reverse=True)
    e2 = json.loads(_chat(client, extra_body={"routing": {"explain": True, "task": "arithmetic"}})[0]["x-icl-router-explain"])
    assert e2["layer"] == "task"  # the tiny anchors' task: the task layer decided
    bad = _http(service.url + "/chat/completions", method="POST", key=API_KEY,
                body={"model": "auto", "messages": [{"role": "user", "content": "x"}], "routing": {"explain": 1}})
    assert bad[0] == 400 and bad[2]["error"]["param"] == "routing.explain"

    rid = raw.headers["x-icl-router-request-id"]
    deadline, got = time.monotonic() + 60, []  # a bounded wait for the batch exporter
    while time.monotonic() < deadline and not got:
        got = [sp for sp in service.otlp.spans if sp["name"] == "icl_router.request" and sp["attrs"].get("icl_router.request_id") == rid]
        time.sleep(0.5)
    assert got, f"no request span exported for {rid}; {len(service.otlp.spans)} spans seen"
    req = got[0]
    a = req["attrs"]
    assert a["icl_router.chosen"] == e["chosen"] and a["icl_router.model"] == raw.headers["x-icl-router-model"] and a["http.status_code"] == 200
    assert {k for k in a if k.startswith("icl_router.p.")} == {"icl_router.p.tiny-a", "icl_router.p.tiny-b"} and a["icl_router.layer"] == "plain"
    assert a["icl_router.mass"] == pytest.approx(e["evidence_mass"], abs=1e-3) and a["icl_router.guard"] == e["guard"]["decided"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = [sp for sp in service.otlp.spans if sp["parent"] == req["id"]]
        if {k["name"] for k in kids} == {"icl_router.router", "icl_router.model"}:
            break
        time.sleep(0.5)
    assert {k["name"] for k in kids} == {"icl_router.router", "icl_router.model"} and all(k["trace"] == req["trace"] for k in kids)
    assert [k["attrs"]["icl_router.model"] for k in kids if k["name"] == "icl_router.model"] == [a["icl_router.model"]]


@pytest.mark.timeout(300)
def test_a_shadow_candidate_decides_beside_the_live_router_and_its_report_exists(service, client, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icl_router.evaluation.shadow_report import run_shadow_report

    flush = service.base + "/admin/shadow/flush"
    assert _http(flush, method="POST", body={}, key=API_KEY)[0] == 401  # admin only
    _http(flush, method="POST", body={}, key=ADMIN_KEY)  # what earlier tests routed: out of the way
    sent = {}
    for i in range(6):
        headers, resp = _chat(client, f"{QUERY} (shadow {i})", max_tokens=1)
        assert resp.model in COSTS and resp.model != SHADOW_MODEL  # never served
        sent[headers["x-icl-router-request-id"]] = headers["x-icl-router-chosen"]
    deadline, rows = time.monotonic() + 60, []
    while time.monotonic() < deadline:  # the shadow decides after the answer: a bounded wait for its rows
        status, _, out = _http(flush, method="POST", body={}, key=ADMIN_KEY)
        assert status == 200
        files = sorted(Path(out["dir"]).glob("part-*.parquet"))
        rows = [r for f in files for r in pq.read_table(f).to_pylist() if r["request_id"] in sent]
        if len(rows) == len(sent):
            break
        time.sleep(1)
    assert len(rows) == len(sent), rows
    for r in rows:
        assert r["live_model"] == sent[r["request_id"]] and r["candidate"] == "with-new" and r["shadow_error"] is None
        assert json.loads(r["shadow_p"]).keys() == {"tiny-a", "tiny-b", SHADOW_MODEL} and r["shadow_scored_by"] == "router"
    # the candidate's model is right on every anchor: it should be picked at least once, and it is never served
    assert any(r["shadow_model"] == SHADOW_MODEL for r in rows)
    # outcomes for half the requests (as re-profiled traffic would give): the live pick wrong, a different candidate pick right
    by_id = {r["request_id"]: r for r in rows}
    known = list(sent)[:3]
    switched = [k for k in known if by_id[k]["shadow_model"] != by_id[k]["live_model"]]
    outcomes = tmp_path / "outcomes"
    outcomes.mkdir()
    pq.write_table(pa.table({"query_id": known + switched, "model_id": [by_id[k]["live_model"] for k in known] + [by_id[k]["shadow_model"] for k in switched],
                             "correct": [False] * len(known) + [True] * len(switched)}), outcomes / "part-0.parquet")
    rep = run_shadow_report(out["dir"], [str(outcomes)], str(tmp_path / "report"))
    c = rep["candidates"]["with-new"]
    print(json.dumps(c))
    assert c["decided"] >= len(sent) and 0 <= c["agreement"] < 1 and c["predicted_gain"] is not None and c["switches"]
    assert c["realised"] == {"rows": 3, "live_accuracy": 0.0, "shadow_accuracy": round(len(switched) / 3, 6), "gain": round(len(switched) / 3, 6)}
    assert (tmp_path / "report" / "shadow_report.md").exists()


# ---- fuzzing: schemathesis over the service's own OpenAPI schema ----------------------------------

FUZZ = {"cases": 0, "by_operation": collections.Counter(), "unsatisfiable": []}


def _fuzz_case(case) -> None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    path = case.operation.path
    if path == "/admin/models" and case.method == "POST" and isinstance(case.body, dict):
        case.body.pop("serving", None)  # deploying generated models is the deployment test's job, not the fuzzer's
    key = ADMIN_KEY if path.startswith("/admin") else API_KEY
    response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=60)  # a service that stops answering fails here
    _record(response.status_code, response.content)
    FUZZ["cases"] += 1
    FUZZ["by_operation"][f"{case.method} {path}"] += 1
    case.validate_response(
        response,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance],
    )


FUZZ_EXAMPLES = {"positive": 80, "negative": 40}  # per operation and generation mode (fewer where the inputs allow fewer)


def _examples() -> dict[str, list[dict]]:
    from icl_router.serving.protocol import ChatBody, CompletionBody

    return {path: cls.model_config["json_schema_extra"]["examples"] for path, cls in
            (("/v1/chat/completions", ChatBody), ("/v1/completions", CompletionBody))}


EXAMPLES = _examples()


def fuzz(base_url: str, examples: dict[str, int] = FUZZ_EXAMPLES) -> None:
    """Schemathesis-generated requests for every operation of the service's own schema: valid ones and
    invalid ones, plus the schema's examples; each response checked by ``_fuzz_case``. Deterministic
    (derandomized), bounded by the example counts."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    for op in (r.ok() for r in schema.get_all_operations()):
        inputs = bool(op.body) or any(len(c) for c in (op.path_parameters, op.query, op.headers))
        strategies = [op.as_strategy(generation_mode=GenerationMode.POSITIVE)]
        if inputs:
            strategies.append(op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        for example in EXAMPLES.get(op.path, ()):  # the schema's examples: a routed chat, a streamed one with a policy
            _fuzz_case(op.Case(body=example, media_type="application/json"))
        for (mode, n), strategy in zip(examples.items(), strategies):
            @settings(max_examples=n, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def one(case):
                _fuzz_case(case)

            try:
                one()
            except Unsatisfiable:  # no invalid input exists for this operation (e.g. a string path parameter)
                FUZZ["unsatisfiable"].append(f"{op.method.upper()} {op.path} {mode}")


@pytest.mark.timeout(600)
def test_fuzz_every_endpoint_gets_no_5xx_and_answers_by_its_schema(service):
    t0 = time.monotonic()
    fuzz(service.base)
    print(f"fuzz: {FUZZ['cases']} cases in {time.monotonic() - t0:.0f} s: {dict(FUZZ['by_operation'])}")


@pytest.mark.timeout(60)
def test_the_fuzzing_covered_every_endpoint_and_the_service_still_answers(service, client):
    assert len(FUZZ["by_operation"]) == 11 and FUZZ["cases"] >= 500, FUZZ
    assert _http(service.base + "/health")[0] == 200 and _chat(client)[1].choices


def _metric(text: str, name: str) -> dict[str, float]:
    """Sum of a Prometheus counter by its code label."""
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            code = labels.split('code="', 1)[1].split('"', 1)[0]
            out[code] += float(value)
    return dict(out)


@pytest.mark.timeout(300)
def test_prometheus_metrics_count_every_error_the_tests_received(service, client):
    for _ in range(3):
        _chat(client)
    want = {str(c): float(n) for c, n in SENT.items() if c >= 400}
    assert want.get("400") and want.get("503")
    deadline, got, text = time.monotonic() + 240, {}, ""  # a bounded wait for the exporter; ends once the counts agree
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(service.metrics, timeout=10).read().decode()
        got = {c: v for c, v in _metric(text, "ray_icl_router_requests_total").items() if int(c) >= 400}
        if got == want:
            break
        time.sleep(2)
    print(f"4xx/5xx received by the tests {want}, counted by the service {got}")
    # A 503 is also what an ingress replica answers while the chaos test kills the pool under it; Serve may
    # replace that replica, and its counter leaves /metrics with it: 503s may be under-counted, never over.
    lost_503 = want.get("503", 0.0) - got.get("503", 0.0)
    assert 0 <= lost_503 <= 0.1 * want["503"], (got, want)
    assert {c: v for c, v in got.items() if c != "503"} == {c: v for c, v in want.items() if c != "503"}
    for name in ("ray_icl_router_answers_total", "ray_icl_router_open_circuits", "ray_icl_router_ready", "icl_router_scoring_latency_ms_bucket",
                 "icl_router_batch_size_bucket"):
        assert name in text, name
    ready = [line for line in text.splitlines() if line.startswith("ray_icl_router_ready{")]
    assert ready and all(line.endswith(" 1.0") for line in ready)


@pytest.mark.timeout(400)
def test_every_dashboard_metric_is_exported_and_the_status_page_shows_each_panel(service, client):
    """Each metric a panel of cluster/grafana/icl-router.json reads is in /metrics after traffic; /dashboard
    (admin key) renders the same panels from the same series; headless Chromium screenshots it."""
    from icl_router.serving.dashboard import PANELS, metric_names

    for model in ("icl-router", "tiny-a", "tiny-b"):  # routed and direct latency, both models' answers and spend
        headers, _ = _chat(client, model=model, max_tokens=1)
        if model == "icl-router":  # an outcome of the routed answer: the outcome counters
            body, t0 = {"request_id": headers["x-icl-router-request-id"], "correct": True}, time.monotonic()
            # another ingress replica knows the id once the log's shard is written (flush_interval_s): a bounded retry
            while (fb := _http(service.url + "/feedback", method="POST", key=API_KEY, body=body))[0] == 404 and time.monotonic() - t0 < 30:
                time.sleep(1)
            assert fb[0] == 200, fb
    want = metric_names()
    deadline, missing = time.monotonic() + 240, want
    while time.monotonic() < deadline and missing:  # a bounded wait for the exporter
        text = urllib.request.urlopen(service.metrics, timeout=10).read().decode()
        names = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
        missing = [m for m in want if m not in names]
        time.sleep(2)
    print(f"dashboard metrics {want}")
    assert not missing, missing
    lat = [line for line in text.splitlines() if line.startswith("ray_icl_router_request_latency_ms_count")]
    assert any('route="routed"' in x for x in lat) and any('route="direct"' in x for x in lat)

    assert _http(service.base + "/dashboard", key=API_KEY)[0] == 401  # admin only
    req = urllib.request.Request(service.base + "/dashboard", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        page = r.read().decode()
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    assert all(f'id="{p.key}"' in page for p in PANELS) and "tiny-a" in page and "sk-test" not in page  # key names, never keys
    html_path = service.root / "dashboard.html"
    html_path.write_text(page)
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no headless Chromium here (apt-get install chromium): the page was checked, not screenshotted")
    png = service.root / "dashboard.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}", "--window-size=1280,760",
                    f"file://{html_path}"], check=True, timeout=120, capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = os.environ.get("ICL_ROUTER_DASHBOARD_PNG")  # docs/dashboard.png is refreshed this way
    if out:
        shutil.copy(png, out)


# ---- production traffic feeds the profiles (issue 25) ------------------------------------------------

TRAFFIC_TASK = "qa"  # not the anchors' task: the plain layer routes it; decision_log.graders grades its references
TRAFFIC_TEXTS = ["What is the sum of 17 and 25?", "Who wrote Hamlet?", "Name a prime number.", "What colour is the sky?", "Spell the word cat."]


def _routed(service, text: str) -> tuple[int, dict]:
    body = {"model": "icl-router", "messages": [{"role": "user", "content": text}], "max_tokens": 2, "routing": {"task": TRAFFIC_TASK}}
    status, headers, _ = _http(service.url + "/chat/completions", method="POST", body=body, key=API_KEY)
    return status, headers


@pytest.mark.timeout(600)
def test_logged_traffic_reprofiled_changes_the_served_routing(service, monkeypatch):
    """N routed requests write N decision-log rows; for a query the two tiny models answer differently, the
    reference sent as feedback is the answer of the model the router does *not* pick; `icl-router reprofile`
    through the service grades that model right and the other wrong, the outcomes join the router
    directory's evidence store, and the next routed request for that query goes to it, without a restart.
    A second run judges logged queries without a reference with tiny-a as the judge: a random-weight judge
    never opens the gate, so its outcomes stay out. (After the metrics test: its requests are not counted.)"""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from icl_router.config import CandidateModelConfig, JudgeConfig, ReprofileConfig, SamplingConfig
    from icl_router.data.profile import build_prompt
    from icl_router.data.reprofile import run_reprofile
    from icl_router.graders import grade
    from icl_router.routing import evidence_store
    from icl_router.serving import decision_log as dl

    router_dir, log_dir = service.root / "router", service.root / "log"
    ids, chosen = [], {}
    for text in TRAFFIC_TEXTS:  # N routed requests: N rows, one per request id
        for _ in range(2):
            status, headers = _routed(service, text)
            assert status == 200, headers
            ids.append(headers["x-icl-router-request-id"])
            chosen[text] = headers["x-icl-router-chosen"]

    def ours():
        log = dl.read_log(log_dir)
        return [r for r in log.to_pylist() if r["request_id"] in set(ids)]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(ours()) < len(ids):
        time.sleep(0.5)
    rows = ours()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # N requests, N rows
    assert all(r["task"] == TRAFFIC_TASK and r["query_text"] in TRAFFIC_TEXTS and r["model"] in COSTS and len(r["p"]) == 2 for r in rows)

    # bad feedback changes nothing and names the field
    status, _, body = _http(service.url + "/feedback", method="POST", body={"request_id": "req-nope", "correct": True}, key=API_KEY)
    assert status == 404 and body["error"]["param"] == "request_id"
    status, _, body = _http(service.url + "/feedback", method="POST", body={"request_id": ids[0], "correct": True, "score": 1.0}, key=API_KEY)
    assert status == 400 and body["error"]["param"] == "score"

    # a query the two models answer differently (asked as reprofile will ask it: greedy, the short style)
    answers, text, target = {}, None, None
    for t in TRAFFIC_TEXTS:
        prompt = build_prompt("exact_match", t, style="short")
        for m in COSTS:
            s, _, out = _http(service.url + "/chat/completions", method="POST", key=API_KEY,
                              body={"model": m, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0.0})
            assert s == 200
            answers[(t, m)] = out["choices"][0]["message"]["content"] or ""
        other = chosen[t]
        tgt = next(m for m in COSTS if m != other)
        if answers[(t, tgt)].strip() and grade("exact_match", answers[(t, tgt)], answers[(t, tgt)], plain=True) == 1 and grade(
                "exact_match", answers[(t, other)], answers[(t, tgt)], plain=True) == 0:
            text, target = t, tgt
            break
    assert text is not None, f"the tiny models answered every query alike: {answers}"
    rid = ids[TRAFFIC_TEXTS.index(text) * 2]
    t0 = time.monotonic()  # another ingress replica knows the id once the log's shard is written: a bounded retry
    while (fb := _http(service.url + "/feedback", method="POST", key=API_KEY, body={"request_id": rid, "reference": answers[(text, target)]}))[0] == 404 \
            and time.monotonic() - t0 < 30:
        time.sleep(1)
    assert fb[0] == 200 and fb[2]["stored"] == ["reference"], fb
    _, before = _routed(service, text)
    assert before["x-icl-router-chosen"] != target

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and rid not in dl.read_log(log_dir, "feedback").column("request_id").to_pylist():  # flushed
        time.sleep(0.5)
    monkeypatch.setenv("TRAFFIC_TEST_KEY", API_KEY)
    base = dict(router=str(router_dir), decision_log=str(log_dir), via="service", service_url=service.url, service_key_env="TRAFFIC_TEST_KEY",
                models=[CandidateModelConfig(name=m, path=str(service.root / m)) for m in COSTS], prompt_style="short",
                sampling=SamplingConfig(max_tokens=4), concurrency=2)
    summary = run_reprofile(ReprofileConfig(**base, sample=1.0))
    print("reprofile:", summary)
    # the two models' graded outcomes, and the dashboard test's `correct` feedback on the model that answered it
    assert summary["sampled"] == 1 and summary["store_rows_added"] == 2 + summary["feedback_outcomes"]
    assert evidence_store.generation(router_dir) == summary["store"]["generation"]

    # the served routing moves, without a restart: the registry sees the store's generation, the router replicas reload it
    deadline, after = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        status, after = _routed(service, text)
        assert status == 200
        if after["x-icl-router-chosen"] == target:
            break
        time.sleep(1)
    assert after["x-icl-router-chosen"] == target, (before, after)
    assert after["x-icl-router-p"] != before["x-icl-router-p"]
    print(f"routing moved {before['x-icl-router-chosen']} -> {target} ({before['x-icl-router-p']} -> {after['x-icl-router-p']})")

    # the judge, through the service by its name, on this test's logged queries without a reference (a log of
    # its rows alone: the module's other routed texts are the fuzzer's); calibrated on the graded query's answers
    mine = service.root / "log-traffic"
    for kind, keep in (("decisions", set(ids)), ("feedback", {rid})):
        (mine / kind).mkdir(parents=True)
        table = dl.read_log(log_dir, kind)
        pq.write_table(table.filter(pc.is_in(table.column("request_id"), pa.array(sorted(keep)))), mine / kind / "part-00000.parquet")
    judged = run_reprofile(ReprofileConfig(**{**base, "decision_log": str(mine)}, dataset=str(log_dir / "reprofile"), sample=1.0, max_queries=4,
                                           judge=JudgeConfig(enabled=True, model="tiny-a")))
    print("reprofile with a judge:", judged)
    j = judged["judge"]
    assert judged["sampled_for_judge"] == judged["sampled"] == 4 and j["via"] == "service" and j["answers"] == 2 * 4 and j["failed_requests"] == 0
    assert j["calibration"]["n"] + j["calibration"]["unparsed"] == 2 and not j["gate"]["passed"] and j["outcomes_added"] == 0
    assert judged["store_rows_added"] == 0
    assert _routed(service, text)[1]["x-icl-router-chosen"] == target  # nothing judged joined the store


@pytest.mark.timeout(1260)  # the three bounded waits below (300 + 480 + 300 s) and slack
def test_load_holds_concurrency_with_zero_errors_and_the_router_scales_up_and_down(client):
    """Under sustained routed load the autoscaler decides to add a router replica (Serve's own status
    says so: UPSCALING, or a second replica starting or running), no request fails meanwhile, and the
    router goes back to one replica after the load. How long scaling takes is printed, not checked."""
    from icl_router.testing import ONE_REPLICA, load_until_scaled, wait_for_one_replica

    got, _ = wait_for_one_replica("RouterDeployment", bound_s=300)
    assert got == ONE_REPLICA, f"the router never settled at one replica before the load: {got}"
    concurrency, max_s = 12, 480
    run = load_until_scaled(lambda i: _chat(client, f"{QUERY} ({i})", max_tokens=1), "RouterDeployment", concurrency=concurrency, max_s=max_s)
    print(run.summary("router", concurrency))
    assert not run.errors, run.errors[:3]
    assert not {s for s, _ in run.seen} & {"UNHEALTHY", "DEPLOY_FAILED"}, run.seen
    assert run.decided is not None, f"the autoscaler never decided to add a router replica in {max_s} s of load: {sorted(run.seen)}"
    got, waited = wait_for_one_replica("RouterDeployment", bound_s=300)
    print(f"back to one router replica {waited:.0f} s after the load")
    assert got == ONE_REPLICA, f"the router did not scale back to one replica: {got}"


# ---- chaos: replicas die under load (last: the pool model it kills takes minutes to come back) --------


def _replica_actors(deployment: str) -> list:
    import ray

    prefix = f"SERVE_REPLICA::icl-router#{deployment}#"  # the state API needs the dashboard: ask the GCS
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return [ray.get_actor(n, namespace="serve") for n in names]


def _kill(deployment: str) -> int:
    import ray

    actors = _replica_actors(deployment)
    for a in actors:
        ray.kill(a, no_restart=True)
    return len(actors)


def _wait(what: str, cond, bound_s: float) -> float:
    """Seconds until ``cond()`` holds; fails after ``bound_s`` (a bounded wait, not a timing check)."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < bound_s, f"{what}: not within {bound_s:g} s"
        time.sleep(0.5)
    return time.monotonic() - t0


@pytest.mark.timeout(900)
def test_chaos_pool_router_and_registry_replicas_die_under_load(service, client):
    """Under 4 concurrent clients: a pool replica, then the router's replicas, then the registry's are
    killed. No routed request fails; headers name every skipped part and why; a stream cut by the kill
    ends with an error event; a direct request to the dead model gets 503 at once (open circuit) unless
    it opted in to fallback; the dead model comes back only through its probe."""
    import openai

    first = _chat(client)[0]["x-icl-router-chosen"]  # the router's pick for QUERY (fixed: same text)
    other = next(m for m in COSTS if m != first)
    results, errors, stop, phase = [], [], threading.Event(), ["normal"]

    def worker():
        while not stop.is_set():
            try:
                results.append((phase[0], _chat(client)[0]))
            except Exception as e:  # any failure fails the test
                errors.append((phase[0], repr(e)))

    def after(p: str) -> list:
        return [h for ph, h in results if ph == p]

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(worker) for _ in range(4)]
        try:
            _wait("normal traffic", lambda: len(results) >= 8, 60)
            # a pool replica, with a stream running on it
            stream = iter(client.chat.completions.create(
                model=first, messages=[{"role": "user", "content": QUERY}], max_tokens=380, stream=True, extra_body={"ignore_eos": True}
            ))
            chunks = [next(stream)]
            phase[0] = "pool"
            assert _kill(f"LLMServer:{first}") == 1
            with pytest.raises(openai.APIError) as broke:
                chunks.extend(stream)
            assert "mid-stream" in broke.value.message and sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) < 380
            _wait("routed requests failing over", lambda: sum("x-icl-router-fallback" in h for h in after("pool")) >= 3, 120)
            with pytest.raises(openai.InternalServerError) as down:  # the named model is known down: 503 at once
                _chat(client, model=first)
            assert down.value.status_code == 503 and down.value.body["code"] == "model_unavailable"
            assert down.value.response.headers["x-icl-router-fallback"] == f"{first}:open_circuit" and down.value.response.headers["retry-after"]
            headers, resp = _chat(client, model=first, extra_body={"routing": {"fallback": True}})
            assert headers["x-icl-router-route"] == "direct" and headers["x-icl-router-model"] == resp.model == other
            assert headers["x-icl-router-fallback"] == f"{first}:open_circuit" and _p(headers).keys() == {other}
            # the router's replicas: routing by the priors meanwhile
            phase[0] = "router"
            assert _kill("RouterDeployment") >= 1
            _wait("requests routed by the priors", lambda: sum("router:" in h.get("x-icl-router-fallback", "") for h in after("router")) >= 3, 120)
            _wait("the router's circuit closing", lambda: _http(_admin(service), key=ADMIN_KEY)[2].get("router") == "closed", 300)
            # the registry's replica: routing goes on; the admin API answers again once it is back
            phase[0] = "registry"
            assert _kill("Registry") == 1
            _wait("the registry answering", lambda: _http(_admin(service), key=ADMIN_KEY)[0] == 200, 120)
            _wait("traffic after the registry's restart", lambda: len(after("registry")) >= 8, 60)
        finally:
            stop.set()
            [f.result() for f in futs]
    print(f"chaos: {len(results)} routed requests, {len(errors)} failed; by phase "
          f"{collections.Counter(ph for ph, _ in results)}; failed over {sum('x-icl-router-fallback' in h for _, h in results)}")
    assert not errors, errors[:3]
    assert all(h["x-icl-router-model"] in COSTS for _, h in results)
    for h in after("pool"):  # the dead model is skipped (after at most the first failure), and the header says why
        if h["x-icl-router-chosen"] == first and h["x-icl-router-model"] != first:
            skipped = dict(kv.split(":") for kv in h["x-icl-router-fallback"].split(";"))
            assert skipped[first] in ("error", "timeout", "open_circuit"), h
    priors = {"tiny-a": float(PROFILE_A.mean()), "tiny-b": 0.5}
    by_priors = [h for h in after("router") if "router:" in h.get("x-icl-router-fallback", "")]
    assert by_priors and all(_p(h) == pytest.approx({m: priors[m] for m in _p(h)}, abs=1e-4) for h in by_priors)  # not p = 0.5
    # the killed model comes back only through its probe: then a request naming it is answered again
    took = _wait(f"{first} back", lambda: _http(_admin(service, first), key=ADMIN_KEY)[2].get("circuit") == "closed", 420)
    print(f"{first} back {took:.0f} s after the registry phase")
    headers, resp = _chat(client, model=first)
    assert resp.model == first and "x-icl-router-fallback" not in headers
