"""The router deployment, and pool models' LLMConfigs (the registry is in registry.py).

Router replicas score against the registry's pool. Every scoring call carries the
pool (epoch, version) its ingress knows; a replica behind it refreshes from the
registry first (one prefix forward per new model, a removal per deleted one), so a
model registered through any ingress is routable by the next query that ingress sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from icl_router.config import PoolModelConfig
from icl_router.serving.failover import Scores

log = logging.getLogger("ray.serve")

# vLLM on CPU: one OMP thread, no pinning, a 1 GiB KV cache (vLLM's default asks for most of the machine's RAM).
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
MAX_ROUTE_CHARS = 4000  # the router reads at most this much of a query (it was trained on short ones)


def llm_config(m: PoolModelConfig) -> Any:
    """The ray.serve.llm LLMConfig of one pool model (deployment ``LLMServer:<name>``)."""
    from ray.serve.llm import LLMConfig

    cpu = m.accelerator == "cpu"
    hw: dict[str, Any] = {"accelerator_config": {"kind": "cpu"}} if cpu else {}
    if m.accelerator_type:
        hw["accelerator_type"] = m.accelerator_type
    return LLMConfig(
        model_loading_config={"model_id": m.name, "model_source": m.path},
        engine_kwargs=dict(m.engine_kwargs),
        deployment_config={"autoscaling_config": m.autoscaling.model_dump(), "max_ongoing_requests": m.max_ongoing_requests},
        runtime_env={"env_vars": {**CPU_ENV, **m.env_vars} if cpu else dict(m.env_vars)},
        **hw,
    )


def deployment_name(model_id: str) -> str:
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


@serve.deployment
class Router:
    """Holds the router (``routing.online.OnlineRouter``: the query embedder with its cache, the
    scorer with the pool's profile caches) and batches concurrent queries into one call.

    ``score`` returns :class:`Scores`: the raw p per model, the query's evidence mass when the router
    directory has a decision layer, and where this replica spent the time (ms): ``queue`` (waiting for
    the batch to start), ``embed``, ``score`` (the router forward), ``batch`` (queries in it), ``cached``.
    """

    async def __init__(
        self, router_dir: str, *, registry: Any, embedder: str | None, max_batch_size: int, batch_wait_timeout_s: float,
        threads: int = 1, embed_cache: int = 4096, embed_dtype: str = "float32", scoring: str = "auto",
    ) -> None:
        from icl_router.routing.online import OnlineRouter
        from icl_router.serving.metrics import router_metrics

        # threads: the replica's share of the cores; more intra-op threads than that spin against
        # vLLM's engine and the other replicas on a small machine
        self.online = OnlineRouter(router_dir, embedder=embedder, scoring=scoring, threads=threads, embed_cache=embed_cache, embed_dtype=embed_dtype)
        log.info("router replica: scoring %s, embedder %s", self.online.scoring, self.online.embedder_name)
        self.registry, self.pool, self.lock = registry, ("", -1), asyncio.Lock()
        self.metrics = router_metrics()
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        await self._sync(None)
        self._score_now([("warm up the embedder and the router", None, time.perf_counter())])

    async def _sync(self, pool: tuple[str, int] | None) -> None:
        await sync_pool(self, pool)

    async def health(self) -> dict:
        return pool_health(self)

    async def score(self, text: str, pool: tuple[str, int], task: str | None = None) -> Scores:
        """The raw p of every routable model for one query naming ``task`` or none (batched with concurrent calls)."""
        if pool[0] != self.pool[0] or pool[1] > self.pool[1]:
            await self._sync(pool)
        return await self._batch((text[:MAX_ROUTE_CHARS], task, time.perf_counter()))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batch(self, items: list[tuple[str, str | None, float]]) -> list[Scores]:
        # On this loop, not in a thread: queries arriving meanwhile wait for the next batch either
        # way, and the two thread hops cost more than they save on loaded cores. (Serve runs this
        # loop in its own thread: the replica's control calls are not blocked.)
        return self._score_now(items)

    def _score_now(self, items: list[tuple[str, str | None, float]]) -> list[Scores]:
        t0 = time.perf_counter()
        tasks = [task for _, task, _ in items]
        s = self.online.score([t for t, _, _ in items], tasks=tasks if any(t is not None for t in tasks) else None)
        if not s.models:
            return [Scores({}) for _ in items]
        self.metrics["scoring_ms"].observe((time.perf_counter() - t0) * 1e3)
        self.metrics["batch_size"].observe(len(items))
        stages = {"embed": s.ms["embed"], "score": s.ms["score"], "batch": len(items), "cached": s.ms["cached"]}
        return [
            _scores(s, i, {"queue": round((t0 - tq) * 1e3, 2), **stages}, self.online)
            for i, (_, _, tq) in enumerate(items)
        ]


async def sync_pool(holder: Any, pool: tuple[str, int] | None) -> None:
    """Load the registry's routable pool into ``holder.online`` (a Router replica or an InProcessRouter)
    unless it already has ``pool`` (epoch, version): adds (one prefix forward each), replaces and
    removes (deleted, or no longer ready)."""
    async with holder.lock:
        if pool is not None and pool[0] == holder.pool[0] and pool[1] <= holder.pool[1]:
            return
        snap = await holder.registry.snapshot.remote()
        await asyncio.to_thread(holder.online.sync, {m: list(p) for m, p in snap.profiles.items()})
        holder.pool = (snap.epoch, snap.version)


def pool_health(holder: Any) -> dict:
    return {"models": len(holder.online.models), "epoch": holder.pool[0], "version": holder.pool[1]}


def _scores(s: Any, i: int, ms: dict, online: Any) -> Scores:
    """Query ``i`` of ``online.score``'s answer ``s``, with the guard's margin of its layer for the pool
    ``online`` holds (routing.online.OnlineRouter.decision)."""
    task_row = bool(s.task_rows[i])
    guard = None if online.decision is None else online.decision.for_task(task_row).min_gain
    return Scores(dict(zip(s.models, s.p[i].tolist())), None if s.mass is None else float(s.mass[i]), ms, guard, task_row)


class _Call:
    """``.remote(...)`` of a local coroutine: the shape of a deployment handle's method, no hop."""

    def __init__(self, fn: Any) -> None:
        self.remote = fn


class InProcessRouter:
    """The router inside the ingress replica (``router.placement: ingress``): the same
    ``OnlineRouter`` as a ``Router`` replica, called without a hop, so it scales with the ingress.

    It offers the ``score`` and ``health`` calls of a Router handle (``.remote(...)`` returns an
    awaitable). A query is scored on the replica's event loop, alone: concurrent queries wait their
    turn there, and the ingress's autoscaling answers a longer queue with another replica.
    """

    def __init__(self, online: Any, registry: Any) -> None:
        from icl_router.serving.metrics import router_metrics

        self.online, self.registry = online, registry
        self.pool, self.lock = ("", -1), asyncio.Lock()
        self.metrics = router_metrics()
        self.score, self.health = _Call(self._score), _Call(self._health)

    @classmethod
    async def create(cls, router_dir: str, *, registry: Any, embedder: str | None, threads: int = 1, embed_cache: int = 4096,
                     embed_dtype: str = "float32", scoring: str = "auto") -> InProcessRouter:
        from icl_router.routing.online import OnlineRouter

        online = await asyncio.to_thread(
            OnlineRouter, router_dir, embedder=embedder, scoring=scoring, threads=threads, embed_cache=embed_cache, embed_dtype=embed_dtype
        )
        log.info("router in the ingress replica: scoring %s, embedder %s", online.scoring, online.embedder_name)
        self = cls(online, registry)
        await self._sync(None)
        online.score(["warm up the embedder and the router"])
        return self

    async def _sync(self, pool: tuple[str, int] | None) -> None:
        await sync_pool(self, pool)

    async def _health(self) -> dict:
        return pool_health(self)

    async def _score(self, text: str, pool: tuple[str, int], task: str | None = None) -> Scores:
        if pool[0] != self.pool[0] or pool[1] > self.pool[1]:
            await self._sync(pool)
        t0 = time.perf_counter()
        s = self.online.score([text[:MAX_ROUTE_CHARS]], tasks=None if task is None else [task])
        if not s.models:
            return Scores({})
        self.metrics["scoring_ms"].observe((time.perf_counter() - t0) * 1e3)
        self.metrics["batch_size"].observe(1)
        return _scores(s, 0, {"queue": 0.0, "embed": s.ms["embed"], "score": s.ms["score"], "batch": 1, "cached": s.ms["cached"]}, self.online)
