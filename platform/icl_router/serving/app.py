"""Build and run the routing service.

``build_app(args)`` is the Serve app builder (``import_path: icl_router.serving.app:build_app``
in a Serve config file or a RayService, args ``{config: serve/production.yaml, overrides: [...]}``
or the ServeConfig fields inline). ``icl-router serve`` starts it locally with ``start``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from icl_router.config import ServeConfig, build_config, expand_env, load_config


def serve_config(args: dict[str, Any]) -> ServeConfig:
    if "config" in args:
        extra = set(args) - {"config", "overrides"}
        if extra:
            from icl_router.config import ConfigError

            raise ConfigError(f"app args: {sorted(extra)} beside 'config'; put them in the file or in 'overrides' (key.sub=value)")
        overrides = [expand_env(str(o), where=f"app args overrides[{i}]") for i, o in enumerate(args.get("overrides") or [])]
        return load_config(ServeConfig, args["config"], overrides)
    return build_config(ServeConfig, dict(args), source="app args")


def compose(cfg: ServeConfig) -> Any:
    """Ingress -> (RouterDeployment, Registry, one LLMServer per pool model), bound by deployment handles
    (``router.placement: ingress``: the router inside the ingress replicas, no RouterDeployment)."""
    from icl_router.serving.auth import Keys

    Keys.from_config(cfg.auth).warn_open()  # no key and not opened on purpose: refuse here, before anything deploys
    if cfg.shadow is not None and cfg.shadow.log_dir:  # replicas run elsewhere: no relative paths
        cfg = cfg.model_copy(update={"shadow": cfg.shadow.model_copy(update={"log_dir": str(Path(cfg.shadow.log_dir).resolve())})})

    from icl_router.model.router_dir import read_anchor_queries, read_meta
    from icl_router.pretrained import prepare_model_path
    from icl_router.serving.endpoint import pool_deployment_name, pool_model_app
    from icl_router.serving.ingress import Ingress
    from icl_router.serving.registry import Registry
    from icl_router.serving.router_deployment import RouterDeployment

    router_dir = str(Path(cfg.router.path).resolve())  # replicas run elsewhere: no relative paths
    cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"path": router_dir})})  # the ingress reads it too (task graders)
    read_meta(router_dir)  # fail here, not in a replica that Serve retries forever
    read_anchor_queries(router_dir)  # likewise: anchors.parquet, when present, must match the anchor ids
    onboarding = cfg.onboarding.model_copy(update={"dir": str(Path(cfg.onboarding.dir).resolve())} if cfg.onboarding.dir else {})
    embedder = cfg.router.embedder
    if embedder and Path(embedder).exists():
        embedder = str(Path(embedder).resolve())
    # every path checked (a .gguf converted) before anything deploys; replicas run elsewhere: absolute paths
    pool = []
    for i, m in enumerate(cfg.pool):
        if m.endpoint is not None:  # a hosted model: nothing to check or convert here
            pool.append(m)
            continue
        path = prepare_model_path(m.path, accelerator=m.accelerator, what=f"pool[{i}].path ({m.name})")
        pool.append(m.model_copy(update={"path": str(Path(path).resolve()) if Path(path).exists() else path}))
    pools = {m.name: pool_model_app(m) for m in pool}  # a vLLM replica, or an endpoint's forwarder: the same handle calls
    limits = {"limits": {k: v.model_dump() for k, v in cfg.auth.limits.items()}, "default_limits": cfg.auth.default_limits.model_dump()}
    registry = Registry.bind(router_dir, costs={m.name: m.cost for m in pool}, persist=cfg.persist_profiles, deploy_timeout_s=cfg.deploy_timeout_s,
                             onboarding=onboarding.model_dump(mode="json"), deployments={m.name: pool_deployment_name(m) for m in pool},
                             limits=limits)
    if cfg.decision_log.dir:  # replicas run elsewhere: an absolute path
        cfg = cfg.model_copy(update={"decision_log": cfg.decision_log.model_copy(update={"dir": str(Path(cfg.decision_log.dir).resolve())})})
    embeddings = bool(cfg.decision_log.dir and cfg.decision_log.log_embedding)
    r = cfg.router
    threads = r.threads or max(1, int(r.num_cpus))
    shadow = shadow_args(cfg, router_dir, registry, embedder)
    if r.placement == "ingress":  # the router lives in each ingress replica, which scales as the router would
        local = dict(router_dir=router_dir, embedder=embedder, threads=threads, embed_cache=r.embed_cache, embed_dtype=r.embed_dtype, scoring=r.scoring,
                     device=r.device, dtype=r.dtype, embeddings=embeddings)
        return Ingress.options(
            autoscaling_config=r.autoscaling.model_dump(),
            max_ongoing_requests=r.max_ongoing_requests,
            ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        ).bind(None, registry, pools, cfg=cfg, local=local, shadow=shadow)
    router = RouterDeployment.options(
        autoscaling_config=r.autoscaling.model_dump(),
        max_ongoing_requests=r.max_ongoing_requests,
        ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
    ).bind(
        router_dir, registry=registry, embedder=embedder, max_batch_size=r.max_batch_size, batch_wait_timeout_s=r.batch_wait_timeout_s,
        threads=threads, embed_cache=r.embed_cache, embed_dtype=r.embed_dtype, scoring=r.scoring, device=r.device, dtype=r.dtype,
        embeddings=embeddings,
    )
    return Ingress.options(num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.ingress_max_ongoing_requests).bind(
        router, registry, pools, cfg=cfg, shadow=shadow
    )


def shadow_args(cfg: ServeConfig, router_dir: str, registry: Any, embedder: str | None) -> dict | None:
    """``shadow.Shadow``'s arguments for the ingress (serving/shadow.py), checked here, before anything deploys:
    a ShadowRouter deployment (one replica) when the candidate has its own router directory or pool models;
    none for a policy-only candidate (it re-decides on the live router's scores)."""
    sh = cfg.shadow
    if sh is None:
        return None
    from icl_router.model.router_dir import PROFILES_FILE, read_meta, read_profiles
    from icl_router.serving.router_deployment import RouterDeployment
    from icl_router.serving.shadow import resolve_extra

    shadow_dir = str(Path(sh.router).resolve()) if sh.router else router_dir
    meta = read_meta(shadow_dir)
    live_anchors = read_meta(router_dir).anchor_query_ids
    extra, costs = resolve_extra(sh, meta.anchor_query_ids)
    if not sh.router and not sh.pool:
        return {"handle": None, "decision": None, "extra": {}, "extra_costs": {}}
    same = meta.anchor_query_ids == live_anchors  # the live pool's profiles are on these anchors: synced from the registry
    if not same:  # other anchors: the candidate routes over its own registered pool (+ the shadow pool), fixed
        own = read_profiles(Path(shadow_dir) / PROFILES_FILE, meta.anchor_query_ids) if (Path(shadow_dir) / PROFILES_FILE).exists() else {}
        extra = {m: [bool(x) for x in p] for m, p in own.items()} | extra
    r = cfg.router
    handle = RouterDeployment.options(
        name="ShadowRouter", num_replicas=1, max_ongoing_requests=r.max_ongoing_requests, ray_actor_options={"num_cpus": sh.num_cpus},
    ).bind(
        shadow_dir, registry=registry if same else None, embedder=embedder if shadow_dir == router_dir else None,
        max_batch_size=r.max_batch_size, batch_wait_timeout_s=r.batch_wait_timeout_s, threads=1, embed_cache=r.embed_cache,
        scoring=r.scoring, extra=extra,
    )
    return {"handle": handle, "decision": meta.decision, "extra": extra, "extra_costs": costs}


def build_app(args: dict[str, Any]) -> Any:
    return compose(serve_config(args))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cfg: ServeConfig) -> str:
    """Start Serve on ``cfg.host:cfg.port`` (0: a free port) and deploy the app without waiting for it
    to be ready (``wait_ready``); return the base URL (…/v1)."""
    from ray import serve

    from icl_router.raycluster import ensure_ray
    from icl_router.serving.auth import Keys

    Keys.from_config(cfg.auth)  # refuse a keyless config before starting Ray
    ensure_ray(cfg.ray)
    port = cfg.port or free_port()
    serve.start(http_options={"host": cfg.host, "port": port})
    serve.run_many([serve.RunTarget(compose(cfg), name=cfg.app_name, route_prefix="/")], wait_for_applications_running=False)
    return f"http://{cfg.host}:{port}/v1"


def wait_ready(url: str, *, app_name: str, timeout_s: float) -> float:
    """Seconds until GET /ready answers 200. Raises if the app fails to deploy or ``timeout_s`` passes."""
    import urllib.error
    import urllib.request

    from ray import serve

    t0 = time.monotonic()
    ready = url.removesuffix("/v1") + "/ready"
    while time.monotonic() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(ready, timeout=10) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):  # not up yet (the proxy's 404/503, our 503, refused)
            pass
        status = serve.status().applications.get(app_name)
        if status is not None and str(getattr(status.status, "value", status.status)) == "DEPLOY_FAILED":
            raise RuntimeError(f"the app {app_name!r} failed to deploy: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{ready} did not answer 200 within {timeout_s:g} s")


def run_serve(cfg: ServeConfig) -> None:
    """``icl-router serve``: serve until Ctrl-C."""
    from ray import serve

    url = start(cfg)
    print(f"icl-router: starting {[m.name for m in cfg.pool]} at {url} (GET /ready answers 200 once the router and a model are up)", flush=True)
    took = wait_ready(url, app_name=cfg.app_name, timeout_s=3600)
    print(f"icl-router: serving at {url} (ready in {took:.0f} s; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("icl-router: shutting down", flush=True)
    finally:
        serve.shutdown()
