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

from icl_router.config import ServeConfig, build_config, load_config


def serve_config(args: dict[str, Any]) -> ServeConfig:
    if "config" in args:
        extra = set(args) - {"config", "overrides"}
        if extra:
            from icl_router.config import ConfigError

            raise ConfigError(f"app args: {sorted(extra)} beside 'config'; put them in the file or in 'overrides' (key.sub=value)")
        return load_config(ServeConfig, args["config"], list(args.get("overrides") or []))
    return build_config(ServeConfig, dict(args), source="app args")


def compose(cfg: ServeConfig) -> Any:
    """Ingress -> (Router, Registry, one LLMServer per pool model), bound by deployment handles."""
    from ray.serve.llm import build_llm_deployment

    from icl_router.model.router_dir import read_meta
    from icl_router.serving.deployments import Registry, Router, llm_config
    from icl_router.serving.ingress import Ingress

    router_dir = str(Path(cfg.router.path).resolve())  # replicas run elsewhere: no relative paths
    read_meta(router_dir)  # fail here, not in a replica that Serve retries forever
    embedder = cfg.router.embedder
    if embedder and Path(embedder).exists():
        embedder = str(Path(embedder).resolve())
    pool = [m.model_copy(update={"path": str(Path(m.path).resolve())}) if Path(m.path).exists() else m for m in cfg.pool]
    pools = {m.name: build_llm_deployment(llm_config(m)) for m in pool}
    registry = Registry.bind(router_dir, models={m.name: {"cost": m.cost} for m in pool}, persist=cfg.persist_profiles)
    r = cfg.router
    router = Router.options(
        autoscaling_config=r.autoscaling.model_dump(),
        max_ongoing_requests=r.max_ongoing_requests,
        ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
    ).bind(
        router_dir, registry=registry, embedder=embedder, max_batch_size=r.max_batch_size, batch_wait_timeout_s=r.batch_wait_timeout_s,
        threads=r.threads or max(1, int(r.num_cpus)), embed_cache=r.embed_cache, embed_dtype=r.embed_dtype,
    )
    return Ingress.options(num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.ingress_max_ongoing_requests).bind(
        router, registry, pools, settings=cfg.model_dump(mode="json")
    )


def build_app(args: dict[str, Any]) -> Any:
    return compose(serve_config(args))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cfg: ServeConfig) -> str:
    """Start Serve on ``cfg.host:cfg.port`` (0: a free port), deploy the app, return the base URL (…/v1)."""
    from ray import serve

    from icl_router.raycluster import ensure_ray

    ensure_ray(cfg.ray)
    port = cfg.port or free_port()
    serve.start(http_options={"host": cfg.host, "port": port})
    serve.run(compose(cfg), name=cfg.app_name, route_prefix="/")
    return f"http://{cfg.host}:{port}/v1"


def run_serve(cfg: ServeConfig) -> None:
    """``icl-router serve``: serve until Ctrl-C."""
    from ray import serve

    t0 = time.monotonic()
    url = start(cfg)
    print(f"icl-router: serving {[m.name for m in cfg.pool]} at {url} (ready in {time.monotonic() - t0:.0f} s; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("icl-router: shutting down", flush=True)
    finally:
        serve.shutdown()
