"""An ingress replica's side of the decision log and the feedback on it (no Ray: the handlers call it).

``Traffic.record`` turns one routed request (its plan, what answered, the usage) into a decision-log
row (``decision_log.DECISION_SCHEMA``) and remembers its request id for feedback; ``flush`` writes what
is due (the replica's background round calls it). ``feedback`` checks a ``POST /v1/feedback`` body
against the request it names and stores it (``FEEDBACK_SCHEMA``); a bad one changes nothing and is a
4xx naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from icl_router.config import DecisionLogConfig
from icl_router.serving import decision_log as dl
from icl_router.serving.api_errors import ApiError

log = logging.getLogger("ray.serve")


def task_graders(router_dir: str | Path | None, configured: dict[str, str] | None = None) -> dict[str, str]:
    """task -> grader name: the router's anchors (anchors.parquet's ``task`` and ``grader``), then ``configured``."""
    out: dict[str, str] = {}
    if router_dir is not None:
        try:
            from icl_router.model.router_dir import read_anchor_queries

            t = read_anchor_queries(router_dir)
        except Exception as e:  # an older router directory: no anchors.parquet
            log.info("no task graders from the router's anchors: %s", e)
            t = None
        if t is not None and "grader" in t.column_names:
            for task, grader in zip(t.column("task").to_pylist(), t.column("grader").to_pylist()):
                if task and grader:
                    out.setdefault(task, grader)
    return {**out, **(configured or {})}


class Traffic:
    def __init__(self, cfg: DecisionLogConfig, *, graders: dict[str, str] | None = None,
                 on_drop: Callable[[str, int], None] | None = None, on_feedback: Callable[[str, str, float | None], None] | None = None) -> None:
        self.cfg, self.graders = cfg, dict(graders or {})
        self.on = cfg.dir is not None
        self.on_feedback = on_feedback
        self.recent: OrderedDict[str, dict] = OrderedDict()  # request id -> what feedback needs of its row
        self.logs: dict[str, dl.DecisionLog] = {}
        if self.on:
            for kind in ("decisions", "feedback"):
                self.logs[kind] = dl.DecisionLog(cfg.dir, kind, shard_rows=cfg.shard_rows, flush_interval_s=cfg.flush_interval_s, max_bytes=cfg.max_bytes,
                                                 on_drop=(lambda n, k=kind: on_drop(k, n)) if on_drop else None)

    # ---- decisions ----------------------------------------------------------------------------

    def record(self, *, request_id: str, started: float, text: str, task: str | None, plan: Any, route: str, kind: str, stream: bool,
               model: str | None, status: str, skipped: list[tuple[str, str]], usage: Any, cost: float | None, key: str | None,
               pool: tuple[str, int], policy: str, embedding: list[float] | None = None) -> None:
        """One routed request's row (``plan``: a ``failover.Plan``). Never raises: a row that cannot be built is dropped and counted."""
        if not self.on:
            return
        try:
            d = plan.decision
            row = {
                "request_id": request_id, "time": dl.now(), "query_hash": dl.query_hash(text),
                "query_text": text if self.cfg.log_text else None,
                "query_embedding": embedding if self.cfg.log_embedding else None,
                "task": task, "route": route, "kind": kind, "models": list(d.p), "p": [float(v) for v in d.p.values()],
                "evidence_mass": plan.mass, "scored_by": plan.scored_by,
                "layer": None if plan.params is None else ("task" if plan.task_layer else "plain"),
                "chosen": d.model, "default_model": d.default, "policy": policy, "order": list(d.order),
                "fallback": [f"{m}:{r}" for m, r in [*plan.skipped, *skipped]], "model": model, "status": status, "stream": stream,
                "latency_ms": (time.perf_counter() - started) * 1e3, "scoring_ms": plan.scoring_ms,
                "prompt_tokens": getattr(usage, "prompt_tokens", None), "completion_tokens": getattr(usage, "completion_tokens", None),
                "cost": cost, "key": key, "pool_version": f"{pool[0]}:{pool[1]}",
            }
        except Exception as e:
            log.warning("decision log: cannot build the row of %s: %s: %s", request_id, type(e).__name__, e)
            self.logs["decisions"]._drop(1, f"row not built ({type(e).__name__})")
            return
        self.logs["decisions"].append(row)
        self.recent[request_id] = {"time": row["time"], "task": task, "model": model, "chosen": d.model}
        while len(self.recent) > self.cfg.recent:
            self.recent.popitem(last=False)

    async def flush(self, *, force: bool = False) -> None:
        for lg in self.logs.values():
            if force or lg.due():
                await asyncio.to_thread(lg.flush)

    # ---- feedback -----------------------------------------------------------------------------

    async def feedback(self, body: Any, key: str | None) -> dict:
        """Store ``body`` (protocol.FeedbackBody) for the request it names; ApiError (4xx, the field named) when it cannot be."""
        if not self.on:
            raise ApiError(404, "this service keeps no decision log (decision_log.dir is not set): there is no request to give feedback on",
                           code="request_not_found", param="request_id")
        given = [f for f in ("correct", "score", "reference") if getattr(body, f) is not None]
        if body.correct is not None and body.score is not None:
            raise ApiError(400, "give either correct or score, not both", code="invalid_value", param="score")
        if not given:
            raise ApiError(400, "give one of correct (true/false), score (0..1) or reference (the right answer)", code="invalid_value", param="correct")
        req = await self._find(body.request_id)
        if req["model"] is None:
            raise ApiError(409, f"request {body.request_id} was not answered by any model: there is nothing to give feedback on",
                           code="no_answer", param="request_id")
        if body.reference is not None and self.graders.get(req["task"] or "") is None:
            what = f"its task {req['task']!r} has no grader" if req["task"] else "it named no task (routing.task)"
            raise ApiError(400, f"a reference is graded with the grader of the request's task, and {what}; tasks with a grader: "
                           f"{sorted(self.graders) or 'none'} (decision_log.graders adds more). Send correct or score instead",
                           code="invalid_value", param="reference")
        self.logs["feedback"].append({"request_id": body.request_id, "time": dl.now(), "model": req["model"], "task": req["task"],
                                      "correct": body.correct, "score": body.score, "reference": body.reference,
                                      "grader": None if body.reference is None else self.graders[req["task"]], "key": key})
        if self.on_feedback is not None:  # (model, what it gave, the outcome: correct as 1/0, the score, None for a reference)
            outcome = body.score if body.score is not None else None if body.correct is None else float(body.correct)
            try:
                self.on_feedback(req["model"], given[0], outcome)
            except Exception as e:  # a metric never fails the request
                log.warning("feedback metric: %s", e)
        return {"request_id": body.request_id, "model": req["model"], "task": req["task"], "stored": given}

    async def _find(self, request_id: str) -> dict:
        ttl = timedelta(seconds=self.cfg.feedback_ttl_s)
        req = self.recent.get(request_id)
        if req is None:
            try:
                req = await asyncio.to_thread(dl.find_request, self.cfg.dir, request_id)
            except Exception as e:  # an unreadable log: the id cannot be checked
                log.warning("feedback: reading the decision log: %s: %s", type(e).__name__, e)
                req = None
        if req is None:
            raise ApiError(404, f"no routed request {request_id!r} in this service's decision log (x-icl-router-request-id of a routed answer)",
                           code="request_not_found", param="request_id")
        if dl.now() - req["time"] > ttl:
            raise ApiError(410, f"request {request_id!r} is older than decision_log.feedback_ttl_s ({self.cfg.feedback_ttl_s:g} s): feedback expired",
                           code="request_expired", param="request_id")
        return req
