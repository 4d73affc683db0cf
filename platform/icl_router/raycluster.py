"""Reach Ray: the configured cluster, the job's cluster, or a local one."""

from __future__ import annotations

import os
from pathlib import Path

from icl_router.config import RayConfig


def ensure_ray(cfg: RayConfig) -> None:
    """Connect once; later calls (and an already running driver) keep the session.

    ``address`` wins; else a ``RAY_ADDRESS`` set by ``ray job submit`` means we
    run inside a job and join its cluster (resources must not be passed then);
    else a local cluster starts with ``num_cpus`` logical CPUs.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        temp_dir = str(Path(cfg.temp_dir).resolve()) if cfg.temp_dir else None
        ray.init(num_cpus=cfg.num_cpus, _temp_dir=temp_dir, include_dashboard=False)
