"""The router deployment (``RouterDeployment``), and the same router inside an ingress replica
(``InProcessRouter``, ``router.placement: ingress``).

RouterDeployment replicas score against the registry's pool. Every scoring call carries the
pool (epoch, version) its ingress knows; a replica behind it refreshes from the
registry first (one prefix forward per new model, a removal per deleted one), so a
model registered through any ingress is routable by the next query that ingress sends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from ray import serve

from icl_router.serving.failover import RouterScores

log = logging.getLogger("ray.serve")

MAX_ROUTE_CHARS = 4000  # the router reads at most this much of a query (it was trained on short ones)
EXPLAIN_ANCHORS = 5  # nearest anchors returned when a request asks routing.explain


class PoolRouter:
    """What both placements share: an ``OnlineRouter`` kept in step with the registry's pool, and
    scoring with its metrics."""

    def __init__(self, online: Any, registry: Any, extra: dict[str, list[bool]] | None = None) -> None:
        """``extra``: profiles scored beside the registry's pool (a shadow router's candidates, never served)."""
        from icl_router.serving.metrics import router_metrics

        self.online, self.registry, self.extra = online, registry, dict(extra or {})
        self.embeddings = False  # return each query's embedding (the decision log keeps it: decision_log.log_embedding)
        self.pool, self.lock = ("", -1), asyncio.Lock()
        self.metrics = router_metrics()

    def behind(self, pool: tuple[str, int]) -> bool:
        """Whether the ingress knows a newer pool (epoch, version) than this router holds (never, without a registry)."""
        return self.registry is not None and (pool[0] != self.pool[0] or pool[1] > self.pool[1])

    async def sync(self, pool: tuple[str, int] | None) -> None:
        """Load the registry's routable pool unless it already has ``pool`` (None: load it anyway): adds
        (one prefix forward each), replaces and removes (deleted, or no longer ready)."""
        async with self.lock:
            if pool is not None and not self.behind(pool):
                return
            if self.registry is None:  # a shadow router on other anchors: its own pool, fixed
                await asyncio.to_thread(self.online.sync, dict(self.extra))
                return
            snap = await self.registry.snapshot.remote()
            await asyncio.to_thread(self.online.sync, {m: list(p) for m, p in snap.profiles.items()} | self.extra)
            self.pool = (snap.epoch, snap.version)

    def health(self) -> dict:
        return {"models": len(self.online.models), "epoch": self.pool[0], "version": self.pool[1]}

    def explained(self, s: RouterScores, text: str, explain: bool) -> RouterScores:
        """``s`` with the query's nearest anchors when the request asked why (routing.explain)."""
        if not explain:
            return s
        return dataclasses.replace(s, nearest=tuple(self.online.nearest(text[:MAX_ROUTE_CHARS], EXPLAIN_ANCHORS)))

    def score_now(self, items: list[tuple[str, str | None, float]]) -> list[RouterScores]:
        """Score (text, task or None, time queued) items in one call; each with the guard's margin of its
        layer for the pool held (routing.online.OnlineRouter.decision)."""
        t0 = time.perf_counter()
        tasks = [task for _, task, _ in items]
        s = self.online.score([t[:MAX_ROUTE_CHARS] for t, _, _ in items], tasks=tasks if any(t is not None for t in tasks) else None)
        if not s.models:
            return [RouterScores({}) for _ in items]
        self.metrics["scoring_ms"].observe((time.perf_counter() - t0) * 1e3)
        self.metrics["batch_size"].observe(len(items))
        stages = {"embed": s.ms["embed"], "score": s.ms["score"], "batch": len(items), "cached": s.ms["cached"]}
        decision = self.online.decision
        out = []
        for i, (_, _, tq) in enumerate(items):
            task_row = bool(s.task_rows[i])
            guard = None if decision is None else decision.for_task(task_row).min_gain
            mass = None if s.mass is None else float(s.mass[i])
            model_mass = None if s.model_mass is None else dict(zip(s.models, s.model_mass[i].tolist()))
            emb = tuple(s.emb[i].tolist()) if self.embeddings and s.emb is not None else None
            out.append(RouterScores(dict(zip(s.models, s.p[i].tolist())), mass, {"queue": round((t0 - tq) * 1e3, 2), **stages}, guard, task_row,
                                    model_mass=model_mass, embedding=emb))
        return out


@serve.deployment
class RouterDeployment:
    """Holds the router (``routing.online.OnlineRouter``: the query embedder with its cache, the
    scorer with the pool's profile caches) and batches concurrent queries into one call.

    ``score`` returns :class:`RouterScores`: the raw p per model, the query's evidence mass when the router
    directory has a decision layer, and where this replica spent the time (ms): ``queue`` (waiting for
    the batch to start), ``embed``, ``score`` (the router forward), ``batch`` (queries in it), ``cached``.
    """

    async def __init__(
        self, router_dir: str, *, registry: Any, embedder: str | None, max_batch_size: int, batch_wait_timeout_s: float,
        threads: int = 1, embed_cache: int = 4096, embed_dtype: str = "float32", scoring: str = "auto", device: str = "auto", dtype: str = "auto",
        embeddings: bool = False,
        extra: dict[str, list[bool]] | None = None,
    ) -> None:
        from icl_router.routing.online import OnlineRouter

        # threads: the replica's share of the cores; more intra-op threads than that spin against
        # vLLM's engine and the other replicas on a small machine. device / dtype: the device rule
        # (a replica given a GPU loads the router there, in bfloat16)
        online = OnlineRouter(router_dir, embedder=embedder, scoring=scoring, threads=threads, embed_cache=embed_cache, embed_dtype=embed_dtype,
                              device=device, dtype=dtype)
        log.info("router replica: scoring %s, embedder %s, on %s in %s", online.scoring, online.embedder_name, online.device, online.dtype)
        self.router = PoolRouter(online, registry, extra)
        self.router.embeddings = embeddings
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        await self.router.sync(None)
        self.router.score_now([("warm up the embedder and the router", None, time.perf_counter())])

    async def health(self) -> dict:
        return self.router.health()

    async def score(self, text: str, pool: tuple[str, int], task: str | None = None, explain: bool = False) -> RouterScores:
        """The raw p of every routable model for one query naming ``task`` or none (batched with concurrent calls);
        ``explain``: with its nearest anchors."""
        if self.router.behind(pool):
            await self.router.sync(pool)
        return self.router.explained(await self._batch((text, task, time.perf_counter())), text, explain)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batch(self, items: list[tuple[str, str | None, float]]) -> list[RouterScores]:
        # On this loop, not in a thread: queries arriving meanwhile wait for the next batch either
        # way, and the two thread hops cost more than they save on loaded cores. (Serve runs this
        # loop in its own thread: the replica's control calls are not blocked.)
        return self.router.score_now(items)


class _Call:
    """``.remote(...)`` of a local coroutine: the shape of a deployment handle's method, no hop."""

    def __init__(self, fn: Any) -> None:
        self.remote = fn


class InProcessRouter:
    """The router inside the ingress replica (``router.placement: ingress``): the same
    ``PoolRouter`` as a ``RouterDeployment`` replica, called without a hop, so it scales with the ingress.

    It offers the ``score`` and ``health`` calls of a RouterDeployment handle (``.remote(...)`` returns an
    awaitable). A query is scored on the replica's event loop, alone: concurrent queries wait their
    turn there, and the ingress's autoscaling answers a longer queue with another replica.
    """

    def __init__(self, router: PoolRouter) -> None:
        self.router = router
        self.score, self.health = _Call(self._score), _Call(self._health)

    @classmethod
    async def create(cls, router_dir: str, *, registry: Any, embedder: str | None, threads: int = 1, embed_cache: int = 4096,
                     embed_dtype: str = "float32", scoring: str = "auto", device: str = "auto", dtype: str = "auto",
                     embeddings: bool = False) -> InProcessRouter:
        from icl_router.routing.online import OnlineRouter

        online = await asyncio.to_thread(
            OnlineRouter, router_dir, embedder=embedder, scoring=scoring, threads=threads, embed_cache=embed_cache, embed_dtype=embed_dtype,
            device=device, dtype=dtype,
        )
        log.info("router in the ingress replica: scoring %s, embedder %s", online.scoring, online.embedder_name)
        self = cls(PoolRouter(online, registry))
        self.router.embeddings = embeddings
        await self.router.sync(None)
        online.score(["warm up the embedder and the router"])
        return self

    async def _health(self) -> dict:
        return self.router.health()

    async def _score(self, text: str, pool: tuple[str, int], task: str | None = None, explain: bool = False) -> RouterScores:
        if self.router.behind(pool):
            await self.router.sync(pool)
        return self.router.explained(self.router.score_now([(text, task, time.perf_counter())])[0], text, explain)
