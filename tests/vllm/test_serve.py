"""The routing service end to end: Ray Serve + ray.serve.llm (real vLLM on CPU), driven by the real
`openai` client over loopback.

One app serves the module (its start dominates the time): a tiny router directory built here
with random weights (routing quality is not the point: the plumbing is) whose profiles cover
tiny-a only, and two tiny vLLM models, tiny-a and tiny-b. tiny-b is served by name until the
onboarding test registers its profile, so the tests run in file order.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

API_KEY, ADMIN_KEY = "sk-test-user", "sk-test-admin"
K = 8
COSTS = {"tiny-a": 0.01, "tiny-b": 0.001}
QUERY = "What is the sum of 17 and 25?"


def _router_dir(path: Path, tiny_router_lm) -> Path:
    import torch

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.router_dir import RouterMeta, save_router_dir

    lm, tok = tiny_router_lm  # read-only: the router is saved, and the Serve replicas load it from there
    layout = PromptLayout(tok, query_input="vector", profile_layout="pairs")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(K, 384), anchor_evidence=True)  # the evaluated configuration
    anchors = [f"anchor-{i}" for i in range(K)]
    meta = RouterMeta(
        embedder="all-MiniLM-L6-v2", embedding_dim=384, query_input="vector", profile_layout="pairs",
        placeholder_id=layout.placeholder_id, yes_id=layout.yes_id, no_id=layout.no_id, anchor_query_ids=anchors,
        anchor_evidence=True,
    )
    return save_router_dir(router, path, meta=meta, pool={"tiny-a": np.random.RandomState(0).rand(K) < 0.5})


@pytest.fixture(scope="module")
def service(tiny_router_lm):
    """(base URL, metrics URL): the app up on free loopback ports, everything under one temp dir."""
    import ray
    from ray import serve

    from icl_router.config import (
        AuthConfig,
        AutoscalingConfig,
        PoolModelConfig,
        RayConfig,
        ScorerServeConfig,
        ServeConfig,
    )
    from icl_router.serving.app import free_port, start
    from icl_router.testing import make_tiny_causal_lm

    root = Path(tempfile.mkdtemp(prefix="srv-", dir="/tmp"))  # short: Ray's socket paths have a 107-byte limit
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(root / "tmp")  # vLLM's vllm_dist_* files; workers inherit it
    (root / "tmp").mkdir()
    if ray.is_initialized():
        ray.shutdown()
    metrics_port = free_port()
    ray.init(num_cpus=10, _temp_dir=str(root / "ray"), include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    texts = [QUERY, "Write a Python function that reverses a list.", "Who wrote Hamlet?"]
    pool = [
        PoolModelConfig(
            name=name, path=str(make_tiny_causal_lm(root / name, seed=i, texts=texts)), cost=COSTS[name],
            engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=8),
        )
        for i, name in enumerate(COSTS)
    ]
    fast = dict(upscale_delay_s=1, downscale_delay_s=4, metrics_interval_s=0.5, look_back_period_s=2)
    cfg = ServeConfig(
        router=ScorerServeConfig(
            path=str(_router_dir(root / "router", tiny_router_lm)), num_cpus=1,
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=0.5, **fast),
        ),
        pool=pool,
        auth=AuthConfig(api_keys=[API_KEY], admin_keys=[ADMIN_KEY]),
        port=free_port(),
        first_output_timeout_s=10,
        down_for_s=30,
        max_prompt_chars=2000,
        ray=RayConfig(num_cpus=10),
    )
    t0 = time.monotonic()
    url = start(cfg)
    print(f"service up in {time.monotonic() - t0:.0f} s at {url}")
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()
    if old_tmp is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = old_tmp
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(service):
    import openai

    return openai.OpenAI(base_url=service[0], api_key=API_KEY, timeout=60, max_retries=0)


def _http(url: str, *, method: str = "GET", body: bytes | dict | None = None, key: str | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _admin(service) -> str:
    return service[0].removesuffix("/v1") + "/admin/models"


def _chat(client, content: str = QUERY, *, model: str = "icl-router", max_tokens: int = 4, **kw):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **kw)
    return raw.headers, raw.parse()


def _timing(headers) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=") for kv in headers["x-icl-router-timing"].split(";"))}


def _p(headers) -> dict[str, float]:
    return {m: float(v) for m, v in (kv.split("=") for kv in headers["x-icl-router-p"].split(","))}


@pytest.mark.timeout(600)
def test_onboarding_makes_a_served_model_routable(service, client):
    status, _, listed = _http(_admin(service), key=ADMIN_KEY)
    assert status == 200 and listed["k"] == K and len(listed["anchors"]) == K
    rows = {r["id"]: r for r in listed["data"]}
    assert rows["tiny-a"]["routable"] and not rows["tiny-b"]["routable"] and rows["tiny-b"]["accuracy"] is None
    headers, _ = _chat(client)
    assert _p(headers).keys() == {"tiny-a"}  # tiny-b is served but has no profile yet

    profile = [True, False] * (K // 2)
    assert _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": profile}, key=API_KEY)[0] == 401  # user key
    bad = _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": profile[:-1]}, key=ADMIN_KEY)
    assert bad[0] == 400 and "K=8" in bad[2]["error"]["message"]
    assert _http(_admin(service), method="POST", body={"model": "nope", "profile": profile}, key=ADMIN_KEY)[0] == 404  # not deployed

    t0 = time.perf_counter()
    status, _, out = _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": profile}, key=ADMIN_KEY)
    headers, resp = _chat(client, extra_body={"routing": {"models": ["tiny-b"]}})
    print(f"onboarding: POST to first routed answer {time.perf_counter() - t0:.2f} s")  # a figure, not a check
    assert status == 201 and out["accuracy"] == pytest.approx(0.5, abs=1e-9)  # a mean of booleans: float arithmetic
    assert headers["x-icl-router-route"] == "routed" and headers["x-icl-router-model"] == "tiny-b" and resp.model == "tiny-b"
    assert _p(_chat(client)[0]).keys() == {"tiny-a", "tiny-b"}  # every routed query now scores both
    rows = {r["id"]: r for r in _http(_admin(service), key=ADMIN_KEY)[2]["data"]}
    assert rows["tiny-b"]["routable"] and rows["tiny-b"]["accuracy"] == pytest.approx(0.5, abs=1e-9)
    again = _http(_admin(service), method="POST", body={"model": "tiny-b", "profile": profile}, key=ADMIN_KEY)
    assert again[0] == 409 and again[2]["error"]["code"] == "model_exists"


@pytest.mark.timeout(120)
def test_routed_and_pass_through_requests(client):
    assert [m.id for m in client.models.list()] == ["icl-router", "auto", "tiny-a", "tiny-b"]
    for alias in ("icl-router", "auto"):
        headers, resp = _chat(client, model=alias)
        p = _p(headers)
        assert headers["x-icl-router-route"] == "routed" and headers["x-icl-router-policy"] == "highest"
        assert headers["x-icl-router-chosen"] == max(p, key=p.get) == headers["x-icl-router-model"] == resp.model
        assert all(0 < v < 1 for v in p.values()) and resp.choices[0].message.content
        assert "x-icl-router-fallback" not in headers
        timing = _timing(headers)  # where the router replica spent the time
        # the stage times are figures (a cached embedding can round to 0 ms): only their presence is checked
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
def test_policies_per_request(client):
    cheap, dear = "tiny-b", "tiny-a"
    cases = [  # (routing field, expected model given p)
        ({"policy": "threshold", "threshold": 0.0}, lambda p: cheap),  # every model clears 0: the cheapest
        ({"policy": "threshold", "threshold": 1.0}, lambda p: max(p, key=p.get)),  # none clears 1: the highest p
        ({"policy": "budget", "budget": 0.005}, lambda p: cheap),  # only tiny-b fits
        ({"policy": "budget", "budget": 0.0}, lambda p: cheap),  # nothing fits: the cheapest
        ({"policy": "margin", "margin": 1.0}, lambda p: cheap),
        ({"models": [dear]}, lambda p: dear),
    ]
    for routing, expect in cases:
        headers, resp = _chat(client, extra_body={"routing": routing})
        p = _p(headers)
        assert headers["x-icl-router-chosen"] == expect(p) == resp.model, routing
        assert headers["x-icl-router-policy"].startswith(routing.get("policy", "highest"))
    import openai

    for bad in ({"policy": "threshold"}, {"policy": "fastest"}, {"models": ["gpt-9"]}, {"budget": "cheap"}):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, extra_body={"routing": bad})
        assert e.value.status_code == 400 and e.value.body["param"] and "routing" in e.value.body["message"]


@pytest.mark.timeout(60)
def test_api_keys_and_admin_key(service, client):
    import openai

    for key in ("", "sk-wrong", ADMIN_KEY):  # the admin key is not an API key
        bad = openai.OpenAI(base_url=service[0], api_key=key or "x", max_retries=0)
        if not key:
            bad = bad.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for key in (None, API_KEY):
        status, _, body = _http(_admin(service), key=key)
        assert status == 401 and body["error"]["type"] == "invalid_request_error"
    assert client.models.list().data  # the right key still works


@pytest.mark.timeout(120)
def test_bad_inputs_get_4xx_openai_errors_and_the_service_keeps_serving(service, client):
    url = service[0] + "/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
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
        ({"messages": msgs}, 400, "invalid_value"),
    ]
    for body, status, code in cases:
        got, _, err = _http(url, method="POST", body=body, key=API_KEY)
        assert (got, err["error"]["code"]) == (status, code), body
        assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    # a prompt over the model's own context (512 tokens) but under the char limit: vLLM's 400, passed on
    got, _, err = _http(url, method="POST", body={"model": "tiny-a", "messages": [{"role": "user", "content": "7 " * 900}]}, key=API_KEY)
    assert got == 400 and "maximum context length" in err["error"]["message"], err
    assert _http(service[0] + "/completions", method="POST", body={"model": "auto", "prompt": ""}, key=API_KEY)[0] == 400
    assert _http(service[0] + "/nowhere", key=API_KEY)[0] == 404
    headers, resp = _chat(client)
    assert resp.choices and headers["x-icl-router-model"] in COSTS


@pytest.mark.timeout(300)
def test_prometheus_metrics(service, client):
    for _ in range(3):
        _chat(client)
    deadline, text = time.monotonic() + 240, ""  # a bounded wait for the exporter; it stops at the first full scrape
    want = ("icl_router_requests", "icl_router_scoring_latency_ms_bucket", "icl_router_batch_size_bucket", "icl_router_client_errors")
    while time.monotonic() < deadline and not all(w in text for w in want):
        time.sleep(2)
        text = urllib.request.urlopen(service[1], timeout=10).read().decode()
    assert all(w in text for w in want), [w for w in want if w not in text]
    routed = [line for line in text.splitlines() if line.startswith("ray_icl_router_requests") and 'route="routed"' in line]
    assert routed and sum(float(line.rsplit(" ", 1)[1]) for line in routed) >= 3


def _replica_actor(model: str):
    import ray

    prefix = f"SERVE_REPLICA::icl-router#LLMServer:{model}#"  # the state API needs the dashboard: ask the GCS
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
    return ray.get_actor(name, namespace="serve")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failover_when_a_pool_replica_dies_under_traffic(client):
    """Routed requests fail over; a stream cut by the kill ends with an error event; a request naming
    the dead model gets a 503 unless it opted in with routing.fallback."""
    import openai
    import ray

    first = _chat(client)[0]["x-icl-router-chosen"]  # the router's pick for QUERY (fixed: same text)
    other = next(m for m in COSTS if m != first)
    results, errors, stop = [], [], threading.Event()

    def worker():
        while not stop.is_set():
            try:
                results.append(_chat(client)[0])
            except Exception as e:  # any failure fails the test
                errors.append(repr(e))

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(worker) for _ in range(4)]
        time.sleep(2)
        stream = iter(client.chat.completions.create(
            model=first, messages=[{"role": "user", "content": QUERY}], max_tokens=380, stream=True, extra_body={"ignore_eos": True}
        ))
        chunks = [next(stream)]  # the stream is running: kill its replica
        ray.kill(_replica_actor(first), no_restart=True)
        killed_at = len(results)
        with pytest.raises(openai.APIError) as broke:
            chunks.extend(stream)
        tokens = sum(bool(c.choices and c.choices[0].delta.content) for c in chunks)
        print(f"stream cut after {tokens} tokens: {broke.value.message}")
        assert "mid-stream" in broke.value.message and tokens < 380

        with pytest.raises(openai.InternalServerError) as down:  # the named model is gone and the request did not opt in
            _chat(client, model=first)
        assert down.value.status_code == 503 and down.value.body["code"] == "model_unavailable"
        headers, resp = _chat(client, model=first, extra_body={"routing": {"fallback": True}})
        assert headers["x-icl-router-route"] == "direct" and headers["x-icl-router-model"] == resp.model == other
        assert headers["x-icl-router-fallback"].startswith(first + ":") and _p(headers).keys() == {first, other}

        deadline = time.monotonic() + 120  # a bounded wait: ends at the third failed-over answer
        while time.monotonic() < deadline and sum("x-icl-router-fallback" in h for h in results) < 3:
            time.sleep(0.5)
        time.sleep(2)
        stop.set()
        [f.result() for f in futs]
    assert not errors, errors[:3]
    after = results[killed_at:]
    fell = [h for h in after if "x-icl-router-fallback" in h]
    assert fell, "no request failed over after the kill"
    assert all(h["x-icl-router-chosen"] == first and h["x-icl-router-model"] == other for h in fell)
    assert all(h["x-icl-router-fallback"].startswith(first + ":") for h in fell)
    assert all(h["x-icl-router-model"] in (first, other) for h in results)
    print(f"failover: {len(results)} requests, {len(fell)} failed over, 0 errors")


LIVE = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION")  # every replica state but STOPPING/STOPPED
ONE = ("HEALTHY", {"RUNNING": 1})  # settled at one replica


def _router_status() -> tuple[str, str, dict[str, int]]:
    """(status, status_trigger, replicas by state) of the Router deployment, from Serve's public status."""
    from ray import serve

    dep = serve.status().applications["icl-router"].deployments["Router"]
    name = lambda v: str(getattr(v, "value", v))  # noqa: E731 - Serve's enums are str enums
    return name(dep.status), name(dep.status_trigger), {name(k): n for k, n in dep.replica_states.items() if n}


def _wait_for_one_router_replica(bound_s: float) -> tuple[tuple[str, dict[str, int]], float]:
    """((status, replicas by state), seconds waited): polls until the router is settled at one replica
    (HEALTHY, one RUNNING, no other replica alive or stopping, no scaling decision pending), or ``bound_s`` pass."""
    t0 = time.monotonic()
    while (got := _router_status()[::2]) != ONE and time.monotonic() - t0 < bound_s:
        time.sleep(1)
    return got, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(1260)  # the three bounded waits below (300 + 480 + 300 s) and slack
def test_load_holds_concurrency_with_zero_errors_and_the_router_scales_up_and_down(client):
    """Under sustained routed load the autoscaler decides to add a router replica (Serve's own status
    says so: UPSCALING, or a second replica starting or running), no request fails meanwhile, and the
    router goes back to one replica after the load.

    How long scaling takes is printed, not checked: starting a replica on a loaded 2-core machine takes
    from under a minute to several. Every wait is bounded and generous, and ends as soon as the state
    it waits for is reached.
    """
    # earlier tests' traffic may have scaled it up, or left a decision pending: any decision seen below is the load's
    got, _ = _wait_for_one_router_replica(300)
    assert got == ONE, f"the router never settled at one replica before the load: {got}"
    # Routed requests (every one goes through Router.score) with new texts (the embedding is computed,
    # not cached) and max_tokens=1 (little time in the pool): the router's ongoing requests stay far
    # above its autoscaling target of 0.5.
    concurrency, max_s = 12, 480
    done, errors, stop, n = [], [], threading.Event(), itertools.count()
    decided = running = None
    seen: set[tuple[str, str]] = set()

    def worker():
        while not stop.is_set() and not errors:
            try:
                done.append(_chat(client, f"{QUERY} ({next(n)})", max_tokens=1)[0])
            except Exception as e:  # any failure fails the test
                errors.append(repr(e))

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        futs = [ex.submit(worker) for _ in range(concurrency)]
        try:
            while time.monotonic() - t0 < max_s and not errors:
                status, trigger, states = _router_status()
                seen.add((status, trigger))
                if decided is None and (status == "UPSCALING" or sum(states.get(s, 0) for s in LIVE) >= 2):
                    decided = time.monotonic() - t0
                if states.get("RUNNING", 0) >= 2:
                    running = time.monotonic() - t0
                    break
                time.sleep(0.5)
        finally:
            stop.set()
            for f in futs:
                f.result()
    took = time.monotonic() - t0
    fmt = lambda t: "never" if t is None else f"at {t:.0f} s"  # noqa: E731
    print(f"load: {len(done)} routed requests at concurrency {concurrency} in {took:.0f} s ({len(done) / took:.1f}/s), "
          f"{len(errors)} errors; scale-up decided {fmt(decided)}, second replica running {fmt(running)}; "
          f"statuses seen {sorted(seen)}")
    assert not errors, errors[:3]
    assert not {s for s, _ in seen} & {"UNHEALTHY", "DEPLOY_FAILED"}, seen
    assert decided is not None, f"the autoscaler never decided to add a router replica in {max_s} s of load: {sorted(seen)}"
    got, waited = _wait_for_one_router_replica(300)
    print(f"back to one router replica {waited:.0f} s after the load")
    assert got == ONE, f"the router did not scale back to one replica: {got}"
