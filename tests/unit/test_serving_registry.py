"""The service's pool registry without a cluster: which models are routable, what onboarding accepts,
what it refuses (with the status and the field), and what DELETE does to a model of the config's pool."""

import asyncio
import json
from dataclasses import asdict

import numpy as np
import pytest

from icl_router.model.router_dir import META_FILE, PROFILES_FILE, RouterMeta, read_profiles, write_profiles
from icl_router.routing.decision import DecisionParams

K = 8


def _router_dir(tmp_path, decision: dict | None = None) -> list[str]:
    anchors = [f"q{i:03d}" for i in range(K)]
    meta = RouterMeta("all-MiniLM-L6-v2", 384, "vector", "pairs", 3, 4, 5, anchors, decision=decision)
    (tmp_path / META_FILE).write_text(json.dumps(asdict(meta)))
    write_profiles(tmp_path / PROFILES_FILE, {"m-weak": np.zeros(K, bool)}, anchors)
    return anchors


@pytest.fixture
def registry(tmp_path, small_dataset):
    """A router directory whose anchors are small_dataset's first K queries, with m-weak registered;
    m-weak and m-best are served (in the serve config's pool), m-mid is not."""
    from icl_router.serving.registry import Registry

    anchors = _router_dir(tmp_path)
    reg = Registry.func_or_class(str(tmp_path), costs={"m-weak": 1.0, "m-best": 2.0}, persist=True)
    return reg, small_dataset, anchors


def _run(coro):
    return asyncio.run(coro)


def _register(reg, model, profile=None, **kw):
    kw = {"dataset": None, "cost": None, "serving": None, "replace": False, **kw}
    return _run(reg.register(model, profile, **kw))


def test_only_served_models_with_a_profile_are_routable_and_registering_bumps_the_version(registry, tmp_path):
    reg, ds, anchors = registry
    snap = reg.snapshot()
    assert snap.routable == ["m-weak"] and snap.models["m-best"].accuracy is None and snap.version == 0 and snap.k == K
    assert snap.priors() == {"m-weak": 0.0} and snap.decision is None
    out = _register(reg, "m-best", {q: i % 4 == 0 for i, q in enumerate(anchors)}, cost=0.5)
    assert out == {"model": "m-best", "state": "ready", "version": 1, "accuracy": pytest.approx(0.25, abs=1e-12)}  # 2 of 8
    snap = reg.snapshot()
    assert snap.profiles["m-best"] == tuple(i % 4 == 0 for i in range(K)) and snap.models["m-best"].cost == 0.5
    assert read_profiles(tmp_path / PROFILES_FILE, anchors).keys() == {"m-weak", "m-best"}  # persisted
    assert reg.get_version() == (snap.epoch, 1)


def test_a_profile_read_from_a_datasets_anchor_outcomes(registry):
    reg, ds, anchors = registry
    _register(reg, "m-best", dataset=str(ds.root))
    from icl_router.data.dataset import correctness_matrix

    want = correctness_matrix(ds.read_outcomes(["m-best"]), anchors, ["m-best"])[:, 0] >= 0.5
    assert reg.snapshot().profiles["m-best"] == tuple(want.tolist())


@pytest.mark.parametrize(
    "model, kw, status, code, param, text",
    [
        ("m-best", {"profile": [True] * (K - 1)}, 400, "invalid_value", "profile", "K=8"),
        ("m-best", {"profile": {"q000": True}}, 400, "invalid_value", "profile", "7 anchors missing"),
        ("m-best", {"profile": [True] * K, "dataset": "/x"}, 400, "invalid_value", "profile", "not both"),
        ("m-best", {}, 400, "invalid_value", "serving", "neither a profile nor a serving path"),
        ("m-best", {"dataset": "/nonexistent/dataset"}, 400, "invalid_value", "dataset", "dataset"),
        ("m-mid", {"profile": [True] * K}, 404, "model_not_found", "model", "not deployed"),
        ("m-weak", {"profile": [True] * K}, 409, "model_exists", "model", "replace: true"),
        ("auto", {"profile": [True] * K}, 400, "invalid_value", "model", "reserved"),
        # the admin `serving` block: checked against the pool-model config before anything is deployed
        ("m-weak", {"profile": [True] * K, "serving": {"path": "MODEL_DIR"}}, 409, "model_exists", "model", "already"),
        ("m-new", {"profile": [True] * K, "serving": {}}, 400, "invalid_value", "serving.path", "required"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/tmp", "colour": 1}}, 400, "invalid_value", "serving.colour", "unknown"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/tmp", "engine_kwargs": 5}}, 400, "invalid_value", "serving.engine_kwargs", "dictionary"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/tmp", "accelerator_type": "H100"}}, 400, "invalid_value", "serving", "accelerator=gpu"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/tmp", "name": "x"}}, 400, "invalid_value", "serving.name", "remove"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "no such model"}}, 400, "invalid_value", "serving.path", "hub id"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/no/such/dir"}}, 400, "invalid_value", "serving.path", "expected a model directory"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/tmp"}}, 400, "invalid_value", "serving.path", "no config.json"),
        # an endpoint model (serving/endpoint.py): its block is checked the same way
        ("m-new", {"profile": [True] * K, "serving": {"endpoint": {"base_url": "ftp://x", "model": "m"}}}, 400, "invalid_value", "serving.endpoint", "http"),
        ("m-new", {"profile": [True] * K, "serving": {"endpoint": {"base_url": "http://x/v1"}}}, 400, "invalid_value", "serving.endpoint.model", "required"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/tmp", "endpoint": {"base_url": "http://x/v1", "model": "m"}}}, 400, "invalid_value",
         "serving", "exactly one of path"),
        ("m-new", {"profile": [True] * K, "serving": {"endpoint": {"base_url": "http://x/v1", "model": "m"}, "engine_kwargs": {"dtype": "f"}}}, 400,
         "invalid_value", "serving", "endpoint model takes none"),
    ],
)
def test_refusals_name_the_field_and_change_nothing(registry, tmp_path, model, kw, status, code, param, text):
    from icl_router.serving.registry import Refusal

    reg, _, _ = registry
    if kw.get("serving", {}).get("path") == "MODEL_DIR":  # a directory that passes the model-path check
        d = tmp_path / "model-dir"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 128, "num_attention_heads": 4}))
        kw = {**kw, "serving": {"path": str(d)}}
    before = reg.snapshot()
    out = _register(reg, model, kw.pop("profile", None), **kw)
    assert isinstance(out, Refusal) and (out.status, out.code, out.param) == (status, code, param), out
    assert text in out.message, out.message
    assert reg.snapshot() == before


def test_replace_updates_a_registered_profile(registry):
    reg, _, _ = registry
    _register(reg, "m-weak", [True] * K, replace=True)
    assert reg.snapshot().profiles["m-weak"] == (True,) * K


def test_delete_of_a_config_pool_model_removes_its_profile_and_keeps_it_served(registry, tmp_path):
    from icl_router.serving.registry import Refusal

    reg, _, anchors = registry
    out = _run(reg.delete("m-weak"))
    assert out == {"model": "m-weak", "deleted": "profile", "torn_down": None}
    snap = reg.snapshot()
    assert snap.routable == [] and snap.models["m-weak"].state == "ready" and snap.version == 1
    assert "m-weak" not in read_profiles(tmp_path / PROFILES_FILE, anchors)  # persisted
    again = _run(reg.delete("m-weak"))  # no profile left: the deployment belongs to the config
    assert isinstance(again, Refusal) and (again.status, again.code) == (409, "model_in_config")
    missing = _run(reg.delete("nope"))
    assert isinstance(missing, Refusal) and (missing.status, missing.param) == (404, "name")
    _register(reg, "m-weak", [True] * K)  # registered again: routable again
    assert reg.snapshot().routable == ["m-weak"]


def test_the_snapshot_carries_the_router_directorys_decision_layer(tmp_path):
    from icl_router.serving.registry import Registry

    params = DecisionParams(tau=0.05, prior_weight=1.0, min_gain=0.02)
    _router_dir(tmp_path, decision=params.to_json())
    reg = Registry.func_or_class(str(tmp_path), costs={"m-weak": 1.0})
    assert reg.snapshot().decision == params


def test_the_registry_keeps_the_services_spend_per_key(tmp_path):
    """Each ingress replica sends its spend each round and reads the totals back (serving/limits.py)."""
    from icl_router.serving.registry import Registry

    _router_dir(tmp_path)
    reg = Registry.func_or_class(str(tmp_path), costs={"m-weak": 0.5}, limits={"limits": {"team-a": {"budget": 1.0}}})
    assert reg.add_spend({"team-a": 0.25}) == {"team-a": 0.25}
    assert reg.add_spend({"team-a": 0.5, "key-x": 0.1}) == {"team-a": 0.75, "key-x": 0.1}
    assert reg.add_spend({}) == {"team-a": 0.75, "key-x": 0.1}


def test_an_endpoint_models_deployment_is_its_forwarder(tmp_path):
    from icl_router.config import PoolModelConfig
    from icl_router.serving.endpoint import pool_deployment_name
    from icl_router.serving.registry import Registry

    _router_dir(tmp_path)
    ep = PoolModelConfig(name="hosted", endpoint={"base_url": "http://127.0.0.1:9/v1", "model": "m"})
    vllm = PoolModelConfig(name="m-weak", path="/tmp")
    assert (pool_deployment_name(ep), pool_deployment_name(vllm)) == ("Endpoint:hosted", "LLMServer:m-weak")
    reg = Registry.func_or_class(str(tmp_path), costs={"m-weak": 1.0, "hosted": 2.0}, deployments={"hosted": pool_deployment_name(ep)})
    assert reg.snapshot().models["hosted"].deployment == "Endpoint:hosted" and reg.snapshot().models["m-weak"].deployment == "LLMServer:m-weak"
