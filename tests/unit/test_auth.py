"""Secure by default: a service that resolves no API key or no admin key refuses to start and names what it
read; opening it is a config choice that logs a warning; keys have names, never exported themselves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from icl_router.config import AuthConfig, ConfigError, ServeConfig, load_config
from icl_router.serving.api_errors import ApiError
from icl_router.serving.auth import OPEN, Keys, key_name

SERVE = Path(__file__).resolve().parents[2] / "serve"


def test_no_key_refuses_and_names_the_config_keys_and_variables():
    with pytest.raises(ConfigError) as e:
        Keys.from_config(AuthConfig(), env={})
    msg = str(e.value)
    for name in ("no API key and no admin key", "auth.api_keys", "$ICL_ROUTER_API_KEYS", "auth.admin_keys", "$ICL_ROUTER_ADMIN_KEYS", "auth.open: true"):
        assert name in msg, (name, msg)
    with pytest.raises(ConfigError, match=r"^no admin key: read auth\.admin_keys and \$ICL_ROUTER_ADMIN_KEYS, found none"):
        Keys.from_config(AuthConfig(api_keys=["sk-a"]), env={})
    with pytest.raises(ConfigError, match=r"no API key: read auth\.api_keys and \$MY_KEYS"):
        Keys.from_config(AuthConfig(api_keys_env="MY_KEYS", admin_keys=["sk-b"]), env={"ICL_ROUTER_API_KEYS": "ignored: another name"})


def test_production_refuses_without_its_secret_and_starts_with_it():
    prod = load_config(ServeConfig, SERVE / "production.yaml")
    with pytest.raises(ConfigError, match=r"ICL_ROUTER_API_KEYS.*ICL_ROUTER_ADMIN_KEYS"):
        Keys.from_config(prod.auth, env={})
    keys = Keys.from_config(prod.auth, env={"ICL_ROUTER_API_KEYS": "team-a:sk-1, sk-2", "ICL_ROUTER_ADMIN_KEYS": "ops:sk-admin"})
    assert dict(keys.api) == {"sk-1": "team-a", "sk-2": key_name("sk-2")} and dict(keys.admin) == {"sk-admin": "ops"} and not keys.open
    assert keys.check("Bearer sk-1") == "team-a" and keys.check("bearer sk-2") == key_name("sk-2") and keys.check("Bearer sk-admin", admin=True) == "ops"
    for auth, admin in (("Bearer sk-admin", False), ("Bearer sk-1", True), (None, False), ("sk-1", False)):
        with pytest.raises(ApiError) as e:
            keys.check(auth, admin=admin)
        assert e.value.status == 401
    assert "sk-2" not in key_name("sk-2") and key_name("sk-2") == key_name("sk-2")


def test_the_demo_carries_its_own_keys():
    demo = load_config(ServeConfig, SERVE / "demo.yaml")
    keys = Keys.from_config(demo.auth, env={})
    assert keys.api and keys.admin and not keys.open


def test_opening_is_explicit_and_logged(caplog):
    keys = Keys.from_config(AuthConfig(admin_keys=["sk-admin"], open=True), env={})
    assert keys.open == {"api"} and keys.check(None) == OPEN
    with pytest.raises(ApiError):
        keys.check(None, admin=True)  # only the missing kind is open
    with caplog.at_level(logging.WARNING, logger="icl_router.serving"):
        keys.warn_open()
    assert "the API (/v1) served WITHOUT a key" in caplog.text and "admin" not in caplog.text


def test_serve_refuses_before_starting_anything(tmp_path, monkeypatch):
    """`icl-router serve` and the RayService's app builder stop at the keys, before Ray or vLLM start."""
    import ray

    import icl_router.raycluster
    from icl_router.serving.app import build_app, start

    monkeypatch.delenv("ICL_ROUTER_API_KEYS", raising=False)
    monkeypatch.delenv("ICL_ROUTER_ADMIN_KEYS", raising=False)
    started = []  # Ray may already be up in this process (an earlier tier): count starts, not state
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append("ray.init"))
    monkeypatch.setattr(icl_router.raycluster, "ensure_ray", lambda *a, **k: started.append("ensure_ray"))
    cfg = ServeConfig.model_validate({"router": {"path": str(tmp_path)}, "pool": [{"name": "m", "path": "/m"}]})
    with pytest.raises(ConfigError, match="no API key and no admin key"):
        start(cfg)
    with pytest.raises(ConfigError, match="no API key and no admin key"):
        build_app({"config": str(SERVE / "production.yaml")})
    assert started == []
