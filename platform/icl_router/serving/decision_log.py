"""The decision log: one Parquet row per routed request, and the feedback on those requests (pure: pyarrow only).

Every routed request of the service appends a row (``DECISION_SCHEMA``) to a ``DecisionLog``; the
log writes them as Parquet shards under ``<dir>/decisions/`` (feedback rows, ``FEEDBACK_SCHEMA``, under
``<dir>/feedback/``):

- **rotated**: every flush (``flush_interval_s``, or ``shard_rows`` rows waiting) writes a new shard,
  ``part-<utc time>-<writer>-<seq>.parquet``, under a temporary name renamed into place, so a reader
  never sees half a file and several writers (ingress replicas) never collide;
- **bounded**: when the shards of a kind hold more than ``max_bytes``, the oldest are deleted;
- **never in the way**: a full disk or an unwritable directory never raises into a request. The
  rows of a failed flush are dropped and counted (``dropped``, and ``on_drop(n)``: the service's
  ``icl_router_log_dropped_total``), and the first failure is logged once (again only after a
  flush has succeeded in between); the buffer never holds more than ``max_buffer_rows``.

A row holds the request id and time, a hash of the routed text (the text itself and its embedding
only when the config allows: ``log_text``, ``log_embedding``), the task if the request named one,
the p per model the decision was made on and the query's evidence mass, the chosen model, the policy,
the failover order and fallbacks, and the latency, tokens and cost of the answer.

``read_log(dir, kind)`` reads every shard back as one table (``icl-router import --format decisions``,
``icl-router reprofile``, the feedback check of an older request id).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("ray.serve")

Kind = Literal["decisions", "feedback"]
REQUEST_ID_HEADER = "x-icl-router-request-id"
FORMAT_VERSION = 1

DECISION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("query_hash", pa.string(), nullable=False),  # sha256 hex of the routed text (``query_hash``)
        pa.field("query_text", pa.string()),  # only with log_text
        pa.field("query_embedding", pa.list_(pa.float32())),  # only with log_embedding (the router's embedder)
        pa.field("task", pa.string()),  # routing.task, when the request named one
        pa.field("route", pa.string(), nullable=False),  # routed | direct (a direct request that fell back)
        pa.field("kind", pa.string(), nullable=False),  # chat | completions
        pa.field("models", pa.list_(pa.string()), nullable=False),  # the candidates, in the order of ``p``
        pa.field("p", pa.list_(pa.float64()), nullable=False),  # the p each was chosen on (after the decision layer)
        pa.field("evidence_mass", pa.float64()),  # the query's evidence mass (null: no decision layer)
        pa.field("scored_by", pa.string(), nullable=False),  # router | prior (the router could not score)
        pa.field("layer", pa.string()),  # plain | task (which decision layer), null without one
        pa.field("chosen", pa.string(), nullable=False),  # the decision's pick
        pa.field("default_model", pa.string()),  # the guard's default, when a guard applied
        pa.field("policy", pa.string(), nullable=False),  # as x-icl-router-policy
        pa.field("order", pa.list_(pa.string()), nullable=False),  # the failover order
        pa.field("fallback", pa.list_(pa.string()), nullable=False),  # parts skipped or failed, "name:reason"
        pa.field("model", pa.string()),  # the model that answered (null: none could)
        pa.field("status", pa.string(), nullable=False),  # ok | unavailable | refused
        pa.field("stream", pa.bool_(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),  # request in to answer (streams: to the first chunk)
        pa.field("scoring_ms", pa.float64(), nullable=False),
        pa.field("prompt_tokens", pa.int64()),  # null: unknown (streams)
        pa.field("completion_tokens", pa.int64()),
        pa.field("cost", pa.float64()),  # the answering model's cost per query (pool config)
        pa.field("key", pa.string()),  # the API key's name (never the key)
        pa.field("pool_version", pa.string(), nullable=False),  # "<epoch>:<version>" of the pool routed on
    ],
    metadata={"icl_router.decision_log": str(FORMAT_VERSION)},
)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("model", pa.string()),  # the model that answered the request
        pa.field("task", pa.string()),
        pa.field("correct", pa.bool_()),  # one of correct / score / reference
        pa.field("score", pa.float64()),
        pa.field("reference", pa.string()),  # the correct answer: the query becomes gradable ...
        pa.field("grader", pa.string()),  # ... with this grader (graders.GRADERS), the request's task's
        pa.field("key", pa.string()),
    ],
    metadata={"icl_router.decision_log": str(FORMAT_VERSION)},
)

SCHEMAS: dict[str, pa.Schema] = {"decisions": DECISION_SCHEMA, "feedback": FEEDBACK_SCHEMA}


def query_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def new_request_id() -> str:
    return uuid.uuid4().hex


def now() -> datetime:
    return datetime.now(UTC)


class DecisionLog:
    """Buffered, rotated, bounded Parquet shards of one kind (``decisions`` or ``feedback``) under ``dir``.

    ``append`` is cheap and never raises; ``flush`` writes what is buffered as one shard (the caller
    runs it off its event loop) and never raises either. Thread-safe.
    """

    def __init__(self, dir: str | Path, kind: Kind = "decisions", *, shard_rows: int = 5000, flush_interval_s: float = 2.0,
                 max_bytes: int = 1 << 30, max_buffer_rows: int = 50_000, on_drop: Callable[[int], None] | None = None) -> None:
        self.dir = Path(dir) / kind
        self.kind, self.schema = kind, SCHEMAS[kind]
        self.shard_rows, self.flush_interval_s, self.max_bytes = shard_rows, flush_interval_s, max_bytes
        self.max_buffer_rows = max(max_buffer_rows, shard_rows)
        self.on_drop = on_drop
        self.writer = uuid.uuid4().hex[:8]  # this writer's part of every shard name
        self.seq = 0
        self.rows: list[dict[str, Any]] = []
        self.written = 0  # rows on disk (this writer)
        self.dropped = 0  # rows lost to a failed flush or a full buffer
        self.failing = False  # the last flush failed (logged once until one succeeds)
        self.last_flush = time.monotonic()
        self.lock, self.flushing = threading.Lock(), threading.Lock()

    # ---- writing ------------------------------------------------------------------------------

    def append(self, row: dict[str, Any]) -> None:
        with self.lock:
            if len(self.rows) >= self.max_buffer_rows:  # flushes keep failing and rows keep coming: drop, never grow
                self._drop(1, "the buffer is full")
                return
            self.rows.append(row)

    def due(self) -> bool:
        """Whether a flush should run now: ``shard_rows`` rows waiting, or rows older than ``flush_interval_s``."""
        with self.lock:
            return bool(self.rows) and (len(self.rows) >= self.shard_rows or time.monotonic() - self.last_flush >= self.flush_interval_s)

    def flush(self) -> int:
        """Write the buffered rows as one shard; the rows written (0 when none or on failure). Never raises."""
        with self.flushing:
            with self.lock:
                rows, self.rows = self.rows, []
                self.last_flush = time.monotonic()
            if not rows:
                return 0
            try:
                table = pa.Table.from_pylist(rows, schema=self.schema)
            except Exception as e:  # a row the schema cannot take is a bug of the caller: count it, never fail a request
                self._drop(len(rows), f"rows do not match the schema ({type(e).__name__}: {e})")
                return 0
            try:
                self._write(table)
            except Exception as e:  # OSError: full disk, unwritable or missing directory, ...
                self._drop(len(rows), f"{type(e).__name__}: {e}")
                return 0
            self.written += len(rows)
            if self.failing:
                log.warning("decision log (%s): writing again to %s", self.kind, self.dir)
            self.failing = False
            self._bound()
            return len(rows)

    def _write(self, table: pa.Table) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seq += 1
        name = f"part-{now().strftime('%Y%m%dT%H%M%S%f')}-{self.writer}-{self.seq:06d}.parquet"
        tmp = self.dir / f".{name}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _bound(self) -> None:
        """Delete the oldest shards (every writer's) while the kind holds more than ``max_bytes``."""
        try:
            shards = sorted(self.dir.glob("part-*.parquet"))
            sizes = [s.stat().st_size for s in shards]
            total = sum(sizes)
            for s, size in zip(shards, sizes):
                if total <= self.max_bytes:
                    break
                s.unlink(missing_ok=True)
                total -= size
        except OSError as e:  # another writer deleted it first, or the directory went away
            log.debug("decision log (%s): bounding %s: %s", self.kind, self.dir, e)

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        if not self.failing:
            log.warning("decision log (%s): dropping rows, cannot write to %s: %s (counted in icl_router_log_dropped_total; "
                        "requests are served as before)", self.kind, self.dir, why)
        self.failing = True
        if self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception:  # a metric must never fail a request either
                pass


def shards(dir: str | Path, kind: Kind = "decisions") -> list[Path]:
    return sorted((Path(dir) / kind).glob("part-*.parquet"))


def read_log(dir: str | Path, kind: Kind = "decisions", *, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """Every shard of ``kind`` under ``dir`` as one table (in shard order; empty with the schema when none)."""
    schema = SCHEMAS[kind]
    parts = [pq.read_table(s, columns=columns, filters=filters, schema=schema) for s in shards(dir, kind)]
    if not parts:
        empty = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        return empty.empty_table()
    return pa.concat_tables(parts)


def find_request(dir: str | Path, request_id: str, *, since: datetime | None = None) -> dict | None:
    """The decision row of ``request_id`` on disk (the newest if several), or None; rows before ``since`` do not count."""
    cols = ["request_id", "time", "task", "chosen", "model", "status", "query_text"]
    filters = [("request_id", "=", request_id)]
    if since is not None:
        filters.append(("time", ">=", since))
    t = read_log(dir, "decisions", columns=cols, filters=filters)
    rows = t.to_pylist()
    return rows[-1] if rows else None
