"""One-call onboarding: a model the registry deploys is run on the router's K anchors through its
own replica, its answers are graded, and its profile is registered (docs/design.md §7).

    POST /admin/models {"model", "serving", "cost"}  ->  deploying -> profiling (n/K graded) -> ready
                                                                                           \\-> failed (reason)

The anchors come from the router directory's ``anchors.parquet`` (text, task, gold, grader;
docs/design.md §5). Each anchor is asked as ``icl-router profile`` asks it (``data/profile.py``
``build_prompt``: the grader's prompt; greedy sampling from ``onboarding.sampling``) and graded
with the project's graders (``graders/``; code answers run in ``sandbox.py``). Outcomes are
appended to the onboarding directory, a dataset (``queries.parquet``: the anchors; ``outcomes/``
partitioned by model_id, append-only, ``Dataset.append_outcomes``), ``shard_size`` at a time;
the profile is read back from there, so a registry that restarts mid-profiling asks only the
anchors without an outcome, and ``icl-router register --dataset`` or ``icl-router value`` can
read the same outcomes. The registry's record of what it deploys (``registrations/``, one JSON
file per model) is what a restarted registry resumes from.

Why the model's own replica, and not the Ray Data + vLLM profile job (``icl-router profile``):

- The replica is deployed anyway, and it is the engine that will serve the routed traffic (its
  weights, engine arguments, chat template and tokenizer): the profile describes the model as
  served, with nothing to keep in step between two engine configurations.
- The profile job would start a second engine of the same model beside the replica: on a CPU
  node another engine's memory and start-up, on a GPU node a second accelerator (or a wait for
  one), and on a local cluster Ray Data LLM's stages each hold a CPU that the Serve replicas
  need. Its advantage, throughput once running, does not pay for that start on K anchors (K is
  a few hundred at most): a replica batches the K concurrent requests itself (vLLM continuous
  batching).
- A model that is not routable yet takes no traffic, so the anchors do not compete with users.

``run_anchors`` is the scheduling (concurrency, retries, grading, shards) with the model call
injected; the registry gives it a call through the model's deployment handle.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from icl_router import schemas
from icl_router.data.dataset import Dataset, conform, correctness_matrix
from icl_router.kinds import PromptStyle

RECORDS_DIR = "registrations"


class OnboardingError(Exception):
    """Profiling on the anchors stopped; the message says why (shown as the model's ``error``)."""


class RefusedByModel(OnboardingError):
    """The model answered an anchor with a 4xx (e.g. the prompt is over its context): no retry helps."""


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float


def ungradable(anchors: pa.Table | None) -> str | None:
    """Why answers on these anchors cannot be graded, or None if every anchor has a known grader and a gold."""
    from icl_router.graders import GRADERS

    if anchors is None:
        return ("the router directory has no anchors.parquet (the anchor queries with gold answers and graders); "
                "write it with `icl-router router-anchors --router <dir> --dataset <the dataset it was trained on>`")
    bad = [
        f"{q} (grader={g!r}{', no gold' if gold is None else ''})"
        for q, g, gold in zip(*(anchors.column(c).to_pylist() for c in (schemas.QUERY_ID, schemas.GRADER, schemas.GOLD)))
        if g not in GRADERS or gold is None
    ]
    if bad:
        return (f"{len(bad)} of the router's {len(anchors)} anchors cannot be graded, e.g. {bad[:3]} (graders are {sorted(GRADERS)}, "
                "each needs a gold answer); fix the anchors' gold/grader in the dataset and write anchors.parquet again "
                "with `icl-router router-anchors`")
    return None


def messages(row: dict[str, Any], *, style: PromptStyle = "json") -> list[dict[str, str]]:
    """The chat request of one anchor, as the profile job builds it (the grader's prompt)."""
    from icl_router.data.profile import build_prompt

    return [{"role": "user", "content": build_prompt(row[schemas.GRADER], row[schemas.TEXT], style=style)}]


class OnboardingStore:
    """The onboarding directory: a dataset of the router's anchors and the outcomes of onboarded models,
    and the registry's records of the models it deploys."""

    def __init__(self, root: str | Path, anchors: pa.Table | None) -> None:
        self.root = Path(root)
        self.ds = Dataset(self.root)
        self.anchors = anchors
        self.ids = [] if anchors is None else anchors.column(schemas.QUERY_ID).to_pylist()

    # ---- the dataset ------------------------------------------------------------------

    def prepare(self) -> None:
        """Write queries.parquet (the anchors, split ``anchor``) if it lacks any; refuse one that holds
        another router's anchors under the same ids (its outcomes would be graded against other golds)."""
        cols = (schemas.TEXT, schemas.GOLD, schemas.GRADER)
        mine = {q: r for q, *r in zip(self.ids, *(self.anchors.column(c).to_pylist() for c in cols))}
        old = self.ds.read_queries() if self.ds.queries_path.is_file() else schemas.QUERIES_SCHEMA.empty_table()
        have = {q: r for q, *r in zip(*(old.column(c).to_pylist() for c in (schemas.QUERY_ID, *cols)))}
        clash = [q for q in mine if q in have and have[q] != mine[q]]
        if clash:
            raise OnboardingError(f"onboarding.dir {self.root} holds other anchor queries under the router's ids (e.g. {clash[:3]}): "
                                  "it belongs to another router; point onboarding.dir elsewhere")
        new = [q for q in self.ids if q not in have]
        if new:
            add = self.anchors.filter(pc.is_in(self.anchors.column(schemas.QUERY_ID), pa.array(new, pa.string())))
            add = add.append_column(schemas.SPLIT, pa.array(["anchor"] * len(add), pa.string()))
            self.ds.write_queries(pa.concat_tables([old, conform(add, schemas.QUERIES_SCHEMA, what="anchors")]))

    def outcomes(self, model_id: str) -> dict[str, bool]:
        """The model's graded anchors so far: query_id -> correct (the majority of its samples, as training reads them)."""
        acc = correctness_matrix(self.ds.read_outcomes([model_id]), self.ids, [model_id])[:, 0]
        return {q: bool(a >= 0.5) for q, a in zip(self.ids, acc) if not np.isnan(a)}

    def profile(self, model_id: str) -> np.ndarray | None:
        """bool [K] in anchor order when every anchor has an outcome, else None."""
        done = self.outcomes(model_id)
        return np.array([done[q] for q in self.ids]) if len(done) == len(self.ids) else None

    def append(self, rows: list[dict[str, Any]]) -> Path:
        (path,) = self.ds.append_outcomes(pa.Table.from_pylist(rows, schema=schemas.OUTCOMES_SCHEMA))
        return path

    # ---- the registry's records ----------------------------------------------------------

    def _record_path(self, model_id: str) -> Path:
        return self.root / RECORDS_DIR / f"{quote(model_id, safe='')}.json"

    def write_record(self, record: dict[str, Any]) -> None:
        path = self._record_path(record["model"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def remove_record(self, model_id: str) -> None:
        self._record_path(model_id).unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        """Every record, oldest first; a file that does not parse is skipped (it was never renamed into place)."""
        folder = self.root / RECORDS_DIR
        out = []
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("model") == unquote(p.stem):
                out.append(rec)
        return sorted(out, key=lambda r: r.get("created", 0.0))


def outcome_row(row: dict[str, Any], answer: Answer, *, model_id: str, cost: float | None, style: PromptStyle = "json") -> dict[str, Any]:
    """Grade one answer into an outcome row, as the profile job grades (``cost``: the pool's expected
    dollars per query; the service prices queries, not tokens)."""
    from icl_router.data.profile import graded_outcome

    return graded_outcome(row, answer.text, model_id=model_id, cost=cost, latency_s=answer.latency_s,
                          prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens, style=style)


async def run_anchors(
    todo: list[dict[str, Any]], *, ask: Callable[[list[dict[str, str]]], Awaitable[Answer]], model_id: str, cost: float | None,
    store: OnboardingStore, concurrency: int, shard_size: int, timeout_s: float, retries: int, on_written: Callable[[int], None],
    style: PromptStyle = "json", max_tokens: dict[str, int] | None = None,
) -> None:
    """Ask, grade and append the outcomes of ``todo`` (anchor rows), ``concurrency`` in flight, ``shard_size``
    rows per file; ``on_written(n)`` after each file. An anchor that fails ``retries + 1`` times (or that the
    model refuses with a 4xx) stops the run with an :class:`OnboardingError`; what was written stays."""
    sem, write_lock = asyncio.Semaphore(concurrency), asyncio.Lock()
    pending: list[dict[str, Any]] = []

    async def flush(final: bool) -> None:
        async with write_lock:
            while pending and (final or len(pending) >= shard_size):
                shard = [pending.pop(0) for _ in range(min(shard_size, len(pending)))]
                await asyncio.to_thread(store.append, shard)
                on_written(len(shard))

    async def one(row: dict[str, Any]) -> None:
        last: Exception | None = None
        for _ in range(retries + 1):
            try:
                async with sem:
                    limit = (max_tokens or {}).get(row.get(schemas.TASK))  # the profile job's per-task limit
                    call = ask(messages(row, style=style)) if limit is None else ask(messages(row, style=style), max_tokens=limit)
                    answer = await asyncio.wait_for(call, timeout_s)
                break
            except RefusedByModel:
                raise
            except Exception as e:  # the replica restarting, a timeout: ask again
                last = e
        else:
            raise OnboardingError(f"anchor {row[schemas.QUERY_ID]!r}: no answer after {retries + 1} tries ({type(last).__name__}: {str(last)[:300]})")
        pending.append(await asyncio.to_thread(outcome_row, row, answer, model_id=model_id, cost=cost, style=style))
        await flush(final=False)

    tasks = [asyncio.ensure_future(one(r)) for r in todo]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    finally:
        # graded answers are kept even when another anchor failed or the run was cancelled mid-way
        # (shielded: a cancelled run still writes what it graded)
        if pending:
            await asyncio.shield(flush(final=True))
