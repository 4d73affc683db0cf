"""What one ingress replica knows of the pool, shared by its handlers.

The registry's last :class:`PoolSnapshot` (polled by version), the circuits of the router and
of every pool model (closed again only by the background probes), the handles of the pool
models, and whether the service has started: the router and one pool model answered once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any

from ray import serve

from icl_router.config import ServeConfig
from icl_router.serving.api_errors import ApiError
from icl_router.serving.circuits import Circuits, probe_open
from icl_router.serving.engine_calls import probe
from icl_router.serving.failover import ROUTER
from icl_router.serving.limits import RateLimiter, SpendLedger
from icl_router.serving.registry import EMPTY, PoolSnapshot

log = logging.getLogger("ray.serve")


async def awaited(response: Any) -> Any:
    """A handle's response as a coroutine (``asyncio.wait_for`` and ``Circuits.call`` take one)."""
    return await response


class PoolView:
    def __init__(self, cfg: ServeConfig, *, router: Any, registry: Any, handles: dict[str, Any]) -> None:
        from icl_router.serving.metrics import ingress_metrics

        self.cfg, self.router, self.registry, self.handles = cfg, router, registry, dict(handles)
        self.metrics = ingress_metrics()
        self.snap: PoolSnapshot = EMPTY
        self.circuits = Circuits()
        self.started = False  # the router and one pool model have answered once
        self.retry_after = str(max(1, math.ceil(cfg.probe_interval_s)))
        # per-key limits (serving/limits.py): this replica admits its share of each rate; spend goes to the registry each round
        replicas = cfg.ingress_replicas if cfg.router.placement == "deployment" else max(1, cfg.router.autoscaling.min_replicas)
        self.rate = RateLimiter(cfg.auth, time.monotonic, share=1.0 / replicas)
        self.ledger = SpendLedger(cfg.auth, time.monotonic)
        # the decision log and the feedback on it (serving/traffic.py), flushed by the background rounds
        from icl_router.serving.traffic import Traffic, task_graders

        self.traffic = Traffic(cfg.decision_log, graders=task_graders(cfg.router.path, cfg.decision_log.graders) if cfg.decision_log.dir else {},
                               on_drop=lambda kind, n: self.metrics["log_dropped"].inc(n, tags={"kind": kind}),
                               on_feedback=self._count_feedback)

    def _count_feedback(self, model: str, kind: str, outcome: float | None) -> None:
        self.metrics["feedback"].inc(tags={"model": model, "kind": kind})
        if outcome:  # a counter only grows: a wrong answer counts in icl_router_feedback_total alone
            self.metrics["feedback_score"].inc(outcome, tags={"model": model})
        if outcome is not None:  # the dashboard's outcome accuracy per model (metrics.count_outcome)
            from icl_router.serving.metrics import count_outcome

            count_outcome(self.metrics, model, outcome, "feedback")

    async def start(self) -> None:
        """Probe rounds before taking traffic, then the background watcher.

        A replica added to a running service (the registry says an ingress has started) repeats them,
        bounded, until the router and a model answer: under load one probe can be slow, and a replica
        taking traffic unstarted would answer 503 to every request. A replica of a service that is
        starting takes traffic after one round, so clients get 503 with Retry-After at once while
        the pool loads, instead of waiting on a replica that is not up."""
        cfg = self.cfg
        deadline = time.monotonic() + 10 * cfg.probe_timeout_s
        while True:
            try:
                await asyncio.wait_for(self.tick(), 2 * cfg.probe_timeout_s)
            except Exception as e:  # the pool is still starting: the watcher goes on
                log.info("probe round before traffic: %s", type(e).__name__)
            if self.started or not self.snap.serving or time.monotonic() > deadline:
                break
            await asyncio.sleep(cfg.probe_interval_s)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as e:  # never let the watcher die
                log.warning("watcher: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.cfg.probe_interval_s)

    async def tick(self) -> None:
        """One round: the pool's version (a new snapshot if it moved), the probes of open circuits, the gauges."""
        try:
            pool = await asyncio.wait_for(awaited(self.registry.get_version.remote()), self.cfg.probe_timeout_s)
            if pool != (self.snap.epoch, self.snap.version):
                await self.refresh()
        except Exception as e:  # the registry restarting: keep the last pool
            log.warning("registry poll failed: %s: %s", type(e).__name__, str(e)[:200])
        await self._sync_spend()
        await self.traffic.flush()
        self.circuits.forget([ROUTER, *self.snap.models])
        ready = self.snap.ready
        await asyncio.gather(
            probe_open(self.circuits, [ROUTER], lambda _: awaited(self.router.health.remote()), timeout_s=self.cfg.probe_timeout_s),
            probe_open(self.circuits, ready, lambda m: probe(self.handle(m), m), timeout_s=self.cfg.probe_timeout_s),
        )
        up = [m for m in ready if not self.circuits.is_open(m)]
        if not self.started and up and not self.circuits.is_open(ROUTER):
            self.started = True
            log.info("ready: the router and %s answer", up)
        if self.started and not self.snap.serving and self.snap.epoch:
            await self._mark_serving()
        self.metrics["open_circuits"].set(len(self.circuits.open_names([ROUTER, *ready])))
        for m, acc in self.snap.priors().items():
            self.metrics["prior_accuracy"].set(acc, tags={"model": m})
        self.metrics["ready"].set(1 if self.ready() else 0)

    async def _sync_spend(self) -> None:
        """Send this replica's spend since the last round, take the service's totals back (a failed round keeps it for the next)."""
        unsent = self.ledger.take_unsent()
        try:
            totals = await asyncio.wait_for(awaited(self.registry.add_spend.remote(unsent)), self.cfg.probe_timeout_s)
        except Exception as e:
            self.ledger.merge(self.ledger.totals, unsent_back=unsent)
            log.warning("registry.add_spend failed: %s", type(e).__name__)
            return
        self.ledger.merge(totals)

    def limit(self, key: str) -> None:
        """A 429 (rate, with Retry-After) or 402 (budget) naming the key's limit, counted by key name; else nothing."""
        over, reason = self.rate.admit(key), "rate"
        if over is None:
            over, reason = self.ledger.admit(key), "budget"
        if over is None:
            return
        self.metrics["limited"].inc(tags={"key": key, "reason": reason})
        raise over

    def spent(self, key: str, model: str) -> None:
        """An answer served for ``key`` by ``model``: the model's cost joins the key's spend."""
        entry = self.snap.models.get(model)
        cost = entry.cost if entry is not None else 0.0
        self.ledger.add(key, cost)
        if cost:
            self.metrics["spend"].inc(cost, tags={"key": key, "model": model})

    async def _mark_serving(self) -> None:
        """Tell the registry the service runs (once per registry replica: a restarted one forgets)."""
        try:
            await asyncio.wait_for(awaited(self.registry.mark_serving.remote()), self.cfg.probe_timeout_s)
            self.snap = dataclasses.replace(self.snap, serving=True)
        except Exception as e:  # the next round tries again
            log.warning("registry.mark_serving failed: %s", type(e).__name__)

    async def refresh(self) -> PoolSnapshot:
        self.snap = await asyncio.wait_for(awaited(self.registry.snapshot.remote()), self.cfg.registry_timeout_s)
        return self.snap

    def ready(self) -> bool:
        return self.started and any(not self.circuits.is_open(m) for m in self.snap.ready)

    def gate(self) -> None:
        """A 503 with Retry-After until the service has started."""
        if not self.started:
            raise ApiError(503, "the service is starting: the router and the pool are not ready yet; retry after Retry-After seconds",
                           code="not_ready", type_="server_error", headers={"Retry-After": self.retry_after})

    def handle(self, model: str) -> Any:
        if model not in self.handles:
            entry = self.snap.models[model]
            self.handles[model] = serve.get_deployment_handle(entry.deployment, app_name=entry.app)
        return self.handles[model]

    def forget_handle(self, model: str) -> None:
        self.handles.pop(model, None)
