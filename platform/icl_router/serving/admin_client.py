"""The CLI's HTTP client of the admin API: `icl-router onboard` against the running service.

    icl-router onboard --config serve/demo.yaml --model m-new --path /models/m-new [--like m-old] [--cost 0.001]

It sends ``POST /admin/models {"model", "serving", "cost"}`` to the service the config describes
(``http://<host>:<port>``, or ``--url``) with the config's first admin key (from ``ICL_ROUTER_ADMIN_KEYS``,
the config's ``auth.admin_keys_env``, else listed in it), then follows ``GET /admin/models/{model}`` and prints each step
(deploying, profiling n/K, ready) until the model is ready (exit 0) or failed (exit 2, with the
reason). A registry restart meanwhile is waited out (503s are retried until ``--timeout``).

Why against the running service and not locally: the running registry owns the pool. It is
the one that deploys the model beside the pool, records the onboarding so a restart resumes
it, and makes the profile routable at once, without a restart of the service. A local variant
would either start a second service or repeat what ``icl-router profile`` + ``icl-router
register`` already do offline (a router directory's pool, read at the next start).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import yaml

from icl_router.config import ConfigError, ServeConfig, deep_merge
from icl_router.errors import UserError


class OnboardError(UserError):
    """The service refused the model, the onboarding failed, or it did not finish in time."""


def serving_block(cfg: ServeConfig, *, like: str | None, serving: str | None, path: str | None) -> dict[str, Any]:
    """The ``serving`` block: the config's pool model ``like`` (without its name and cost), then the YAML
    mapping ``serving`` over it, then ``path``."""
    out: dict[str, Any] = {}
    if like is not None:
        known = {m.name: m for m in cfg.pool}
        if like not in known:
            raise ConfigError(f"--like {like!r}: the config's pool has {sorted(known)}")
        out = known[like].model_dump(mode="json", exclude={"name", "cost"})
    if serving is not None:
        out = deep_merge(out, _serving_fields(serving))
    if path is not None:
        out["path"] = path
    if not out.get("path"):
        raise ConfigError("the model needs a path: give --path (a local model directory or a hub id), or --like a pool model to copy")
    return out


def _serving_fields(text: str) -> dict[str, Any]:
    """``--serving``: pool-model fields as a YAML mapping."""
    try:
        given = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--serving: not YAML ({e.__class__.__name__}); give a mapping, e.g. '{{engine_kwargs: {{max_model_len: 2048}}}}'") from None
    if isinstance(given, dict):
        return given
    raise ConfigError(f"--serving: a mapping of pool-model fields, got {type(given).__name__}")


def service_url(cfg: ServeConfig, url: str | None) -> str:
    if url:
        return url.rstrip("/").removesuffix("/v1")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def admin_key(cfg: ServeConfig) -> str | None:
    """The config's first admin key: from its ``admin_keys_env`` (``ICL_ROUTER_ADMIN_KEYS`` by default), else listed."""
    from icl_router.serving.auth import parse_keys

    env = [k.strip() for k in os.environ.get(cfg.auth.admin_keys_env or "", "").split(",") if k.strip()]
    keys = list(parse_keys([*env, *cfg.auth.admin_keys]))
    return keys[0] if keys else None


def http_json(url: str, *, key: str | None = None, body: dict | None = None, method: str | None = None, timeout_s: float = 60) -> tuple[int, dict]:
    """(status, JSON object body) of one request (GET, or POST with a ``body``, unless ``method`` says)
    without raising on 4xx/5xx; status 0 when nothing answers."""
    method = method or ("GET" if body is None else "POST")
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method)
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, {}
    try:
        out = json.loads(raw)
    except ValueError:
        out = {}
    return status, out if isinstance(out, dict) else {}


def _why(out: dict) -> str:
    err = out.get("error") or {}
    return f"{err.get('message', out)}" + (f" (param {err['param']})" if err.get("param") else "")


def onboard(
    cfg: ServeConfig, *, model: str, serving: dict[str, Any], cost: float | None, url: str | None = None, timeout_s: float = 3600,
    poll_s: float = 1.0, say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """POST the model, then follow it until ready (its row of GET /admin/models/{model}, plus ``seconds``)."""
    base, key = service_url(cfg, url), admin_key(cfg)
    t0 = time.monotonic()
    body = {"model": model, "serving": serving, **({"cost": cost} if cost is not None else {})}
    status, out = http_json(base + "/admin/models", key=key, body=body)
    if status == 0:
        raise OnboardError(f"no service answers at {base}; start it (`icl-router serve --config ...`) or pass --url")
    if status >= 400:
        raise OnboardError(f"{base} refused {model!r} with {status}: {_why(out)}")
    say(f"onboard: {model}: {out.get('state')} (POST answered {status})")
    seen: tuple = ()
    while True:
        status, row = http_json(f"{base}/admin/models/{quote(model, safe='')}", key=key)
        if status == 200:
            progress = row.get("progress") or {}
            now = (row["state"], progress.get("graded"))
            if now != seen:
                seen = now
                step = f"profiling {progress['graded']}/{progress['k']} graded" if row["state"] == "profiling" and progress else row["state"]
                resumed = f" ({progress['resumed']} resumed from written outcomes)" if progress.get("resumed") else ""
                say(f"onboard: {model}: {step}{resumed} at {time.monotonic() - t0:.0f} s")
            if row["state"] == "ready":
                return {**row, "seconds": round(time.monotonic() - t0, 1)}
            if row["state"] == "failed":
                raise OnboardError(f"onboarding {model!r} failed: {row.get('error')}; POST it again to retry (written outcomes are kept), or DELETE it")
        elif status == 404:
            raise OnboardError(f"{model!r} left the pool while onboarding (DELETE /admin/models/{model}?)")
        elif status not in (0, 503):  # 0 / 503: the service or its registry restarting: wait it out
            raise OnboardError(f"GET /admin/models/{model} answered {status}: {_why(row)}")
        if time.monotonic() - t0 > timeout_s:
            raise OnboardError(f"{model!r} is not ready after --timeout {timeout_s:g} s (last state {seen or 'unknown'}); "
                               f"it goes on in the service: GET /admin/models/{model}")
        time.sleep(poll_s)
