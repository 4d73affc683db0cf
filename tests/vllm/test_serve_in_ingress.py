"""The router inside the ingress replicas (``router.placement: ingress``): routing with no hop to a
router deployment, pool changes reaching the in-process router, and autoscaling under load of the
ingress that now carries the router (1 -> 2 -> 1 replicas).

One app for the module (real vLLM on CPU, tiny models; the plumbing, not routing quality, is
tested), with the float32 ONNX variant of the router's embedder, which gives its vectors.
"""

from __future__ import annotations

import time

import pytest

from icl_router.testing import TINY_TEXTS

pytestmark = pytest.mark.vllm

API_KEY, ADMIN_KEY = "sk-test-user", "sk-test-admin"
K = 8
QUERY = TINY_TEXTS[0]


@pytest.fixture(scope="module")
def service():

    from icl_router.config import AuthConfig, AutoscalingConfig, RayConfig, ScorerServeConfig
    from icl_router.serving.app import free_port, start
    from icl_router.testing import make_tiny_router_dir, served_root, tiny_serve_config

    with served_root("srvi-", cache=True, num_cpus=10) as root:
        fast = dict(upscale_delay_s=1, downscale_delay_s=4, metrics_interval_s=0.5, look_back_period_s=2)
        router = ScorerServeConfig(
            path=str(make_tiny_router_dir(root / "router", k=K)), num_cpus=1, placement="ingress", embedder="all-MiniLM-L6-v2@onnx",
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=0.5, **fast),
        )
        cfg = tiny_serve_config(root, router=router, auth=AuthConfig(api_keys=[API_KEY], admin_keys=[ADMIN_KEY]), port=free_port(),
                                first_output_timeout_s=10, router_timeout_s=5, ray=RayConfig(num_cpus=10))
        url = start(cfg)
        yield url


@pytest.fixture(scope="module")
def client(service):
    import openai

    c = openai.OpenAI(base_url=service, api_key=API_KEY, timeout=60, max_retries=0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600:  # bounded: until the router and a pool model answer
        try:
            c.chat.completions.create(model="icl-router", messages=[{"role": "user", "content": QUERY}], max_tokens=1)
            return c
        except openai.APIStatusError as e:
            if e.status_code != 503:
                raise
        except (openai.APITimeoutError, openai.APIConnectionError):
            pass  # a loaded machine: the first request can outlast the client's timeout while the replicas warm up
        time.sleep(1.0)
    pytest.fail("the service never became ready")


def _chat(client, content: str, **kw):
    raw = client.chat.completions.with_raw_response.create(model="icl-router", messages=[{"role": "user", "content": content}], max_tokens=1, **kw)
    return raw.headers, raw.parse()


def test_routed_in_the_ingress_with_stage_times(client):
    headers, resp = _chat(client, f"{QUERY} (in-ingress)")
    assert headers["x-icl-router-route"] == "routed" and resp.choices[0].message is not None
    timing = dict(kv.split("=") for kv in headers["x-icl-router-timing"].split(";"))
    assert {"embed", "score", "queue"} <= set(timing) and float(timing["queue"]) == 0.0  # scored in this replica, no batch queue
    stream = client.chat.completions.create(model="icl-router", messages=[{"role": "user", "content": QUERY}], max_tokens=2, stream=True)
    assert [c for c in stream]  # a routed stream arrives


def test_onboarding_reaches_the_in_process_router(service, client):
    import json
    import urllib.request

    req = urllib.request.Request(service.removesuffix("/v1") + "/admin/models", method="POST",
                                 data=json.dumps({"model": "tiny-b", "profile": [True, False] * (K // 2)}).encode())
    req.add_header("content-type", "application/json")
    req.add_header("authorization", f"Bearer {ADMIN_KEY}")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status in (200, 201, 202)
    headers, _ = _chat(client, f"{QUERY} (after onboarding)")
    assert "tiny-b=" in headers["x-icl-router-p"]  # the in-process router scored the new model


def test_load_scales_the_ingress_up_and_down_with_zero_errors(client):
    from ray import serve

    from icl_router.testing import ONE_REPLICA, load_until_scaled, wait_for_one_replica

    assert "RouterDeployment" not in serve.status().applications["icl-router"].deployments  # no router deployment: the ingress carries the router
    got, _ = wait_for_one_replica("Ingress", bound_s=300)
    assert got == ONE_REPLICA, f"the ingress never settled at one replica before the load: {got}"
    concurrency, max_s = 12, 480
    run = load_until_scaled(lambda i: _chat(client, f"{QUERY} ({i})"), "Ingress", concurrency=concurrency, max_s=max_s)
    print(run.summary("ingress", concurrency))
    assert not run.errors, run.errors[:3]
    assert run.decided is not None, f"the autoscaler never decided to add an ingress replica in {max_s} s of load: {sorted(run.seen)}"
    got, waited = wait_for_one_replica("Ingress", bound_s=300)
    print(f"back to one ingress replica {waited:.0f} s after the load")
    assert got == ONE_REPLICA, f"the ingress did not scale back to one replica: {got}"
