"""A hosted OpenAI-compatible endpoint in the pool, against a real server on loopback (vLLM's own OpenAI
server with a tiny random-weight model, started here; never a mock), and per-key limits.

One service: a tiny router directory, ``tiny-a`` served by ray.serve.llm (real vLLM) and ``tiny-ep``, an
endpoint model whose ``base_url`` is the server. The tests run in file order:

1. routed to the endpoint (its profile is all right): answered through it, streaming too;
2. onboarded through the endpoint: ``POST /admin/models`` with ``serving.endpoint`` and no profile
   deploys its forwarder, asks the router's anchors through the server, grades, registers;
3. per-key limits: a key over its rate gets 429 + Retry-After, a key over its budget 402 naming it;
   both show in /metrics;
4. the server stopped: the next routed request fails over to tiny-a, the endpoint's circuit opens.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from icl_router.testing import TINY_TEXTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

API_KEY, ADMIN_KEY, RATE_KEY, BUDGET_KEY = "sk-ep-user", "sk-ep-admin", "sk-ep-rate", "sk-ep-budget"
K = 8
EP_COST, BUDGET = 0.004, 0.01


@dataclass
class Service:
    base: str
    metrics: str
    root: Path
    server: object  # testing.OpenAIServer


def _http(url: str, *, body: dict | None = None, key: str | None = None, method: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method or ("POST" if body else "GET"))
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def _chat(service: Service, *, key: str = API_KEY, stream: bool = False, **routing) -> tuple[int, dict, bytes]:
    body = {"model": "icl-router", "messages": [{"role": "user", "content": TINY_TEXTS[0]}], "max_tokens": 4, "stream": stream}
    if routing:
        body["routing"] = routing
    return _http(service.base + "/v1/chat/completions", body=body, key=key)


@pytest.fixture(scope="module")
def service():
    from icl_router.config import (
        AuthConfig,
        AutoscalingConfig,
        PoolModelConfig,
        RayConfig,
        ScorerServeConfig,
        ServeConfig,
    )
    from icl_router.serving.app import free_port, start
    from icl_router.testing import make_tiny_causal_lm, make_tiny_router_dir, openai_server, pool_diagnosis, served_root

    metrics_port = free_port()
    with served_root("ep-", num_cpus=8, _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000}) as root:
        upstream = make_tiny_causal_lm(root / "upstream", seed=7, texts=TINY_TEXTS)
        with openai_server(upstream, root=root, name="upstream-tiny", ready_s=None) as server:  # starts beside the service
            endpoint = {"base_url": server.base_url, "model": server.model}
            pool = [
                PoolModelConfig(name="tiny-a", path=str(make_tiny_causal_lm(root / "tiny-a", seed=0, texts=TINY_TEXTS)), cost=0.01,
                                engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
                                autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=8)),
                PoolModelConfig(name="tiny-ep", endpoint=endpoint, cost=EP_COST),
            ]
            auth = AuthConfig(api_keys=[API_KEY, f"team-r:{RATE_KEY}", f"team-b:{BUDGET_KEY}"], admin_keys=[ADMIN_KEY],
                              limits={"team-r": {"requests_per_minute": 1, "burst": 2}, "team-b": {"budget": BUDGET}})
            cfg = ServeConfig(router=ScorerServeConfig(path=str(make_tiny_router_dir(root / "router", k=K)), num_cpus=1), pool=pool, auth=auth,
                              port=free_port(), first_output_timeout_s=20, probe_interval_s=1, deploy_timeout_s=300, ray=RayConfig(num_cpus=8))
            base = start(cfg).removesuffix("/v1")
            server.wait_ready(300)
            t0, circuits = time.monotonic(), {}
            while time.monotonic() - t0 < 600:  # bounded: the router and both models answer
                status, _, raw = _http(base + "/admin/models", key=ADMIN_KEY)
                circuits = {r["id"]: r["circuit"] for r in json.loads(raw or b"{}").get("data", [])} if status == 200 else {}
                if set(circuits) == {"tiny-a", "tiny-ep"} and set(circuits.values()) == {"closed"} and _http(base + "/ready")[0] == 200:
                    break
                time.sleep(1)
            else:
                pytest.fail(f"the pool never all answered: {circuits}\n{pool_diagnosis(root)}")
            # the endpoint's profile: every anchor right, so the router sends it the queries
            status, _, raw = _http(base + "/admin/models", body={"model": "tiny-ep", "profile": [True] * K}, key=ADMIN_KEY)
            assert status == 201, raw
            yield Service(base, f"http://127.0.0.1:{metrics_port}/metrics", root, server)


def test_a_routed_request_is_answered_through_the_endpoint(service):
    status, headers, raw = _chat(service)
    assert status == 200, raw
    assert headers["x-icl-router-route"] == "routed" and headers["x-icl-router-model"] == "tiny-ep" and "x-icl-router-fallback" not in headers
    body = json.loads(raw)
    assert body["model"] == "tiny-ep" and body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] >= 1
    status, headers, raw = _chat(service, stream=True)
    events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert status == 200 and headers["x-icl-router-model"] == "tiny-ep" and events[-1] == "[DONE]"
    assert all(json.loads(e)["model"] == "tiny-ep" for e in events[:-1])
    direct = _http(service.base + "/v1/chat/completions", key=API_KEY,
                   body={"model": "tiny-ep", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert direct[0] == 200 and direct[1]["x-icl-router-route"] == "direct"


def test_an_endpoint_model_is_onboarded_through_its_endpoint(service):
    """No profile given: the registry deploys its forwarder and asks the anchors through the server."""
    endpoint = {"base_url": service.server.base_url, "model": service.server.model}
    status, _, raw = _http(service.base + "/admin/models", body={"model": "tiny-ep2", "serving": {"endpoint": endpoint}, "cost": 0.002}, key=ADMIN_KEY)
    assert status == 202, raw
    t0, row = time.monotonic(), {}
    while time.monotonic() - t0 < 300:  # bounded: deploying -> profiling -> ready
        row = json.loads(_http(service.base + "/admin/models/tiny-ep2", key=ADMIN_KEY)[2] or b"{}")
        if row.get("state") in ("ready", "failed"):
            break
        time.sleep(0.5)
    assert row.get("state") == "ready", row
    assert row["progress"]["graded"] == K and row["accuracy"] is not None and row["deployment"] == "Endpoint:tiny-ep2"
    bad = _http(service.base + "/admin/models", key=ADMIN_KEY, body={"model": "tiny-x", "serving": {"endpoint": {**endpoint, "base_url": "ftp://x"}}})
    assert bad[0] == 400 and json.loads(bad[2])["error"]["param"].startswith("serving.endpoint")


def test_a_key_over_its_rate_gets_429_and_over_its_budget_402(service):
    got = [_chat(service, key=RATE_KEY) for _ in range(3)]
    assert [g[0] for g in got[:2]] == [200, 200] and got[2][0] == 429, [g[0] for g in got]
    print(f"429: Retry-After {got[2][1].get('retry-after')}, {got[2][2].decode()}")
    err = json.loads(got[2][2])["error"]
    assert err["code"] == "rate_limit_exceeded" and "key 'team-r' is over its rate limit of 1 requests per minute" in err["message"]
    assert float(got[2][1]["retry-after"]) > 0
    statuses = []
    for _ in range(6):  # each answer spends the answering model's cost; the budget holds at most three endpoint answers
        status, _, raw = _chat(service, key=BUDGET_KEY)
        statuses.append(status)
        if status != 200:
            break
    print(f"budget key: {statuses}; the refusal: {raw.decode()}")
    assert statuses[-1] == 402 and set(statuses[:-1]) == {200}, statuses
    err = json.loads(raw)["error"]
    assert err["code"] == "budget_exceeded" and "key 'team-b' has spent" in err["message"] and f"of its budget of {BUDGET:g}" in err["message"]
    assert _chat(service)[0] == 200  # another key is not limited
    t0, text = time.monotonic(), ""
    while time.monotonic() - t0 < 60:  # Ray exports metrics every second: a bounded wait for them
        text = urllib.request.urlopen(service.metrics, timeout=10).read().decode()
        if 'reason="rate"' in text and 'reason="budget"' in text and "icl_router_spend_total" in text:
            break
        time.sleep(1)
    limited = [ln for ln in text.splitlines() if ln.startswith("ray_icl_router_limited_total{")]
    assert any('key="team-r"' in ln and 'reason="rate"' in ln for ln in limited), limited
    assert any('key="team-b"' in ln and 'reason="budget"' in ln for ln in limited), limited
    assert any(ln.startswith("ray_icl_router_spend_total{") and 'key="team-b"' in ln for ln in text.splitlines())


def test_the_endpoint_down_fails_over_and_opens_its_circuit(service):
    service.server.stop()
    status, headers, raw = _chat(service)
    assert status == 200, raw
    assert headers["x-icl-router-chosen"] == "tiny-ep" and headers["x-icl-router-model"] != "tiny-ep"
    assert headers["x-icl-router-fallback"].startswith("tiny-ep:"), headers
    status, headers, _ = _chat(service)
    assert status == 200 and "tiny-ep:open_circuit" in headers["x-icl-router-fallback"]
    row = json.loads(_http(service.base + "/admin/models/tiny-ep", key=ADMIN_KEY)[2])
    assert row["circuit"] == "open"
