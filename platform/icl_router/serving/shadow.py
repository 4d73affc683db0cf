"""Shadow routing: a candidate router decides on the same requests as the live one; logged, never served.

The candidate (``serve.shadow``, ``config.ShadowConfig``) differs from the live router by any of: a router
directory, a policy, and models in its pool that the service does not serve (e.g. a candidate valued by
``icl-router value``: routed to by its profile alone). With only a policy it re-decides on the live
router's own scores (no extra call); otherwise a ``ShadowRouter`` deployment (a ``RouterDeployment`` of the
candidate's directory, one replica) scores the query, after the live answer is under way and off its path:
a shadow that fails or lags never touches a served request, it only logs an error row.

Rows (``SHADOW_SCHEMA``) go to Parquet shards in ``log_dir`` (``part-<ms>-<hex>.parquet``, written under a
temporary name and renamed), one per flush, the oldest removed beyond ``max_files``. An unwritable
directory drops rows, counts them (``icl_router_shadow_dropped_total``) and says so once in the log.
``icl-router shadow-report`` (``evaluation/shadow_report.py``) compares the two routers from the shards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from icl_router.serving.decision_log import query_hash

log = logging.getLogger("ray.serve")
RETRY_S = 5.0  # a shadow router that failed is asked again after this long
MAX_PENDING = 256  # shadow decisions in flight per ingress replica; beyond it a request is not shadowed (counted as dropped)

SHADOW_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("time", pa.timestamp("ms", tz="UTC")),
    ("candidate", pa.string()),
    ("query_hash", pa.string()),
    ("task", pa.string()),
    ("live_model", pa.string()),  # the live decision's pick
    ("served_model", pa.string()),  # the model that answered (after failover)
    ("live_p", pa.string()),  # JSON {model: p} the live choice was made on
    ("live_policy", pa.string()),
    ("shadow_model", pa.string()),  # null: the shadow could not decide (``shadow_error``)
    ("shadow_p", pa.string()),  # JSON {model: p} the shadow's choice was made on
    ("shadow_policy", pa.string()),
    ("shadow_scored_by", pa.string()),  # router | prior | live (a policy-only shadow re-decides on the live scores)
    ("agree", pa.bool_()),
    ("predicted_gain", pa.float64()),  # shadow's p of its pick - shadow's p of the live pick (the shadow's own view)
    ("shadow_error", pa.string()),
])


class ShadowLog:
    """Rows buffered in memory, written as one Parquet shard per flush (``flush_rows`` rows or ``flush_s`` seconds)."""

    def __init__(self, log_dir: str | Path, *, flush_rows: int, flush_s: float, max_files: int, dropped: Any = None) -> None:
        self.dir, self.flush_rows, self.flush_s, self.max_files = Path(log_dir), flush_rows, flush_s, max_files
        self.rows: list[dict] = []
        self.first_at: float | None = None
        self.dropped, self.warned, self.written = dropped, False, 0

    def add(self, row: dict) -> None:
        if not self.rows:
            self.first_at = time.monotonic()
        self.rows.append(row)

    def due(self) -> bool:
        return bool(self.rows) and (len(self.rows) >= self.flush_rows or time.monotonic() - (self.first_at or 0) >= self.flush_s)

    def flush(self) -> int:
        """Write the buffered rows as one shard (blocking: call it in a thread); returns the rows written."""
        rows, self.rows, self.first_at = self.rows, [], None
        if not rows:
            return 0
        import pyarrow.parquet as pq

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"part-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = self.dir / f".{name}.tmp"
            pq.write_table(pa.Table.from_pylist(rows, schema=SHADOW_SCHEMA), tmp)
            os.replace(tmp, self.dir / name)
            shards = sorted(self.dir.glob("part-*.parquet"))
            for old in shards[: max(0, len(shards) - self.max_files)]:
                old.unlink(missing_ok=True)
        except OSError as e:
            if self.dropped is not None:
                self.dropped.inc(len(rows))
            if not self.warned:
                self.warned = True
                log.warning("shadow log: cannot write %s (%s): dropping shadow rows (counted in icl_router_shadow_dropped_total)", self.dir, e)
            return 0
        self.written += len(rows)
        return len(rows)


class Shadow:
    """The ingress replica's side of shadow routing: decide, log, flush; nothing here can fail a request."""

    def __init__(self, cfg: Any, *, live_policy: Any, handle: Any | None, decision: dict | None, extra: dict[str, list[bool]],
                 extra_costs: dict[str, float], router_timeout_s: float, metrics: dict | None = None) -> None:
        from icl_router.routing.decision import DecisionParams
        from icl_router.serving.circuits import Circuits

        self.cfg, self.handle = cfg, handle
        self.policy = cfg.policy.build() if cfg.policy is not None else live_policy
        self.decision = None if decision is None else DecisionParams.from_json(decision)
        self.extra = {m: list(p) for m, p in extra.items()}
        self.extra_priors = {m: (sum(p) / len(p) if p else 0.0) for m, p in self.extra.items()}
        self.extra_costs = dict(extra_costs)
        self.timeout_s, self.circuits, self.down_until = router_timeout_s, Circuits(), 0.0
        self.metrics = metrics or {}
        self.log = ShadowLog(cfg.log_dir, flush_rows=cfg.flush_rows, flush_s=cfg.flush_s, max_files=cfg.max_files,
                             dropped=self.metrics.get("shadow_dropped"))
        self.tasks: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None

    def sampled(self) -> bool:
        return self.cfg.sample >= 1.0 or random.random() < self.cfg.sample

    def submit(self, **kw: Any) -> None:
        """Decide and log in the background (``decide``'s arguments); a shadow that lags drops requests, never queues them."""
        if len(self.tasks) >= MAX_PENDING:
            if "shadow_dropped" in self.metrics:
                self.metrics["shadow_dropped"].inc()
            return
        t = asyncio.get_running_loop().create_task(self._run(**kw))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _run(self, **kw: Any) -> None:
        try:
            row = await self.decide(**kw)
        except Exception as e:  # never surfaces: a row says what went wrong
            log.warning("shadow: %s: %s", type(e).__name__, e)
            return
        self.log.add(row)
        if "shadow" in self.metrics:
            self.metrics["shadow"].inc(tags={"candidate": self.cfg.name, "agree": str(row["agree"]).lower()})

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.flush_s))
            if self.log.due():
                await asyncio.to_thread(self.log.flush)
            if not self.log.rows and not self.tasks:
                return

    async def drain(self) -> int:
        """Finish the pending decisions and write every buffered row now (tests, shutdown)."""
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        return await asyncio.to_thread(self.log.flush)

    async def decide(self, *, text: str, task: str | None, live: Any, snap: Any, candidates: list[str], request_id: str,
                     served_model: str) -> dict:
        """One row: the live plan ``live`` (``failover.Plan``) beside the candidate's decision on the same query."""
        from icl_router.routing.policy import choose
        from icl_router.serving.failover import ROUTER, plan

        d = live.decision
        row: dict[str, Any] = {
            "request_id": request_id, "time": int(time.time() * 1000), "candidate": self.cfg.name, "query_hash": query_hash(text), "task": task,
            "live_model": d.model, "served_model": served_model, "live_p": json.dumps({m: round(v, 6) for m, v in d.p.items()}),
            "live_policy": d.policy.kind, "shadow_policy": self.policy.kind, "shadow_model": None, "shadow_p": None, "shadow_scored_by": None,
            "agree": None, "predicted_gain": None, "shadow_error": None,
        }
        priors = snap.priors() | self.extra_priors
        costs = snap.costs() | self.extra_costs
        if self.handle is None:  # a policy-only candidate: the live router's scores, another policy
            sd = choose(dict(live.raw_p), policy=self.policy, costs=costs, prior=priors if live.params else None,
                        mass=live.mass if live.params else None, params=live.params)
            scored_by = "live"
        else:
            cands = [*candidates, *[m for m in self.extra if m not in candidates]]
            pool = (snap.epoch, snap.version)

            async def score(t: str) -> Any:
                return await self.handle.score.remote(t, pool, task)

            if time.monotonic() < self.down_until:  # failed lately: not asked again before RETRY_S (no probe loop of its own)
                row["shadow_error"] = "router:open_circuit"
                return row
            self.circuits.close(ROUTER)
            sp = await plan(text, candidates=cands, priors={m: priors[m] for m in cands}, costs=costs, policy=self.policy,
                            params=self.decision, score=score, circuits=self.circuits, timeout_s=self.timeout_s)
            if sp.scored_by != "router":
                self.down_until = time.monotonic() + RETRY_S
                row["shadow_error"] = ";".join(f"{m}:{r}" for m, r in sp.skipped) or "router"
                return row
            sd, scored_by = sp.decision, "router"
        row.update({
            "shadow_model": sd.model, "shadow_p": json.dumps({m: round(v, 6) for m, v in sd.p.items()}), "shadow_scored_by": scored_by,
            "agree": sd.model == d.model,
            "predicted_gain": round(sd.p[sd.model] - sd.p.get(d.model, float("nan")), 6) if d.model in sd.p else None,
        })
        return row


def resolve_extra(cfg: Any, anchor_ids: list[str]) -> tuple[dict[str, list[bool]], dict[str, float]]:
    """The shadow pool's profiles (K outcomes each, ``anchor_ids`` order) and costs; a bad one is a ConfigError naming it."""
    from icl_router.config import ConfigError

    profiles, costs = {}, {}
    for i, m in enumerate(cfg.pool):
        where = f"shadow.pool[{i}] ({m.name!r})"
        if m.profile is not None:
            if len(m.profile) != len(anchor_ids):
                raise ConfigError(f"{where}.profile has {len(m.profile)} outcomes; the shadow router has K={len(anchor_ids)} anchors: one per anchor, in order")
            profiles[m.name] = list(m.profile)
        else:
            from icl_router.data.dataset import Dataset, DatasetError
            from icl_router.routing.register import anchor_profiles

            try:
                profiles[m.name] = [bool(x) for x in anchor_profiles(Dataset(m.dataset), [m.name], anchor_ids)[m.name]]
            except (DatasetError, OSError) as e:
                raise ConfigError(f"{where}.dataset: {e}") from None
        costs[m.name] = m.cost
    return profiles, costs
