"""The service's pool registry without a cluster: which models are routable, and what onboarding accepts."""

import asyncio
import json
from dataclasses import asdict

import numpy as np
import pytest

from icl_router.model.router_dir import META_FILE, PROFILES_FILE, RouterMeta, read_profiles, write_profiles

K = 8


@pytest.fixture
def registry(tmp_path, small_dataset):
    """A router directory whose anchors are small_dataset's first K queries, with m-weak registered;
    m-weak and m-best are served (in the serve config's pool), m-mid is not."""
    from icl_router.serving.deployments import Registry

    anchors = [f"q{i:03d}" for i in range(K)]
    meta = RouterMeta("all-MiniLM-L6-v2", 384, "vector", "pairs", 3, 4, 5, anchors)
    (tmp_path / META_FILE).write_text(json.dumps(asdict(meta)))
    write_profiles(tmp_path / PROFILES_FILE, {"m-weak": np.zeros(K, bool)}, anchors)
    reg = Registry.func_or_class(str(tmp_path), models={"m-weak": {"cost": 1.0}, "m-best": {"cost": 2.0}}, persist=True)
    return reg, small_dataset, anchors


def _register(reg, model, profile=None, **kw):
    kw = {"dataset": None, "cost": None, "serving": None, "replace": False, **kw}
    return asyncio.run(reg.register(model, profile, **kw))


def test_only_served_models_with_a_profile_are_routable_and_registering_bumps_the_version(registry, tmp_path):
    reg, ds, anchors = registry
    snap = reg.snapshot()
    assert list(snap["routable"]) == ["m-weak"] and snap["models"]["m-best"]["accuracy"] is None and snap["version"] == 0
    out = _register(reg, "m-best", {q: i % 4 == 0 for i, q in enumerate(anchors)}, cost=0.5)
    assert {k: v for k, v in out.items() if k != "accuracy"} == {"model": "m-best", "state": "ready", "version": 1}
    assert out["accuracy"] == pytest.approx(0.25, abs=1e-9)  # a mean of booleans: float arithmetic
    snap = reg.snapshot()
    assert snap["routable"]["m-best"] == [i % 4 == 0 for i in range(K)]
    assert snap["models"]["m-best"]["cost"] == pytest.approx(0.5, abs=1e-12)  # a float kept, compared as a value
    assert read_profiles(tmp_path / PROFILES_FILE, anchors).keys() == {"m-weak", "m-best"}  # persisted


def test_a_profile_read_from_a_datasets_anchor_outcomes(registry):
    reg, ds, anchors = registry
    _register(reg, "m-best", dataset=str(ds.root))
    from icl_router.data.dataset import correctness_matrix

    want = correctness_matrix(ds.read_outcomes(["m-best"]), anchors, ["m-best"])[:, 0] >= 0.5
    assert reg.snapshot()["routable"]["m-best"] == want.tolist()


@pytest.mark.parametrize(
    "model, kw, error, text",
    [
        ("m-best", {"profile": [True] * (K - 1)}, ValueError, "K=8"),
        ("m-best", {"profile": {"q000": True}}, ValueError, "7 anchors missing"),
        ("m-best", {"profile": [True] * K, "dataset": "/x"}, ValueError, "exactly one"),
        ("m-best", {}, ValueError, "exactly one"),
        ("m-mid", {"profile": [True] * K}, KeyError, "not deployed"),
        ("m-weak", {"profile": [True] * K}, FileExistsError, "replace: true"),
        ("m-weak", {"profile": [True] * K, "serving": {"path": "/m"}}, FileExistsError, "already"),
        ("m-new", {"profile": [True] * K, "serving": {"path": "/m", "accelerator_type": "H100"}}, ValueError, "accelerator=gpu"),
    ],
)
def test_refusals_change_nothing(registry, model, kw, error, text):
    reg, _, _ = registry
    before = reg.snapshot()
    with pytest.raises(error, match=text):
        _register(reg, model, kw.pop("profile", None), **kw)
    assert reg.snapshot() == before


def test_replace_updates_a_registered_profile(registry):
    reg, _, _ = registry
    _register(reg, "m-weak", [True] * K, replace=True)
    assert reg.snapshot()["routable"]["m-weak"] == [True] * K
