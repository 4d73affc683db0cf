"""The evidence store: outcomes on production queries beside the anchors (pure: numpy + pyarrow).

A model's profile is its record on the K anchors. Re-profiling sampled traffic (``icl-router
reprofile``) and feedback add more records: (query embedding, model, outcome) rows on queries the
anchors may not cover. They live in the router directory, ``evidence/evidence.parquet`` (long format,
``EVIDENCE_SCHEMA``) with ``evidence/manifest.json`` (its generation, which the registry watches),
bounded to the newest ``max_queries`` queries. Every router replica loads them on a pool sync;
nothing is retrained.

How they count (``store_kernel`` then ``combine``): a store row j adds its outcome y_mj with the
weight ``w_j = exp((cos(q, e_j) - 1) / tau)`` (the decision layer's kernel, at its ``tau``) to model
m's estimate, beside the router's p, which counts for the query's anchor evidence mass S:

    p'_m = (S p_m + sum_j w_j y_mj) / (S + W_m),   W_m = sum_j w_j [m has an outcome on j]

and ``S + W_m`` is the model's evidence mass, against which the decision layer shrinks p'_m toward
the model's prior (``decision.shrink``). So a query like many re-profiled ones is routed by their
outcomes, and one unlike them as before.

**Partial outcomes** (feedback names only the model that answered) are guarded: feedback on the
routed model alone makes only its own estimate move, and the router then leaves a model that fails
on hard queries for models whose estimates are still optimistic (docs/results.md, bench feedback).
With ``partial="cap"`` (the default) a model's store weight near a query counts only up to the most
any other model has there: a model's estimate moves against the others' only where they are evidenced
too. ``partial="discount"`` scales it by ``discount`` instead; ``raw`` takes it as it is.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STORE_DIR = "evidence"
STORE_FILE = "evidence.parquet"
MANIFEST = "manifest.json"
Partial = Literal["cap", "discount", "raw"]

EVIDENCE_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),  # the decision log's request id, or a dataset's query id
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),  # the router's embedder (unit vector)
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),  # 0..1
        pa.field("source", pa.string(), nullable=False),  # reprofile | feedback
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class EvidenceStoreError(ValueError):
    pass


@dataclass(frozen=True)
class Evidence:
    """The store as the scorer reads it: N queries' unit embeddings [N, E] and every model's scores
    [N] (NaN: no outcome), and the generation it was read at."""

    emb: np.ndarray  # [N, E] float32
    scores: dict[str, np.ndarray]  # model -> [N] float64, NaN where unknown
    generation: str

    @property
    def n(self) -> int:
        return len(self.emb)

    def matrix(self, models: list[str]) -> np.ndarray:
        """[T, N] scores of ``models`` (NaN rows for a model the store has not seen)."""
        return np.stack([self.scores.get(m, np.full(self.n, np.nan)) for m in models]) if models else np.zeros((0, self.n))


def store_path(router_dir: str | Path) -> Path:
    return Path(router_dir) / STORE_DIR


def generation(router_dir: str | Path) -> str:
    """The store's generation ('' when there is none): what a replica compares to know it must reload."""
    try:
        return json.loads((store_path(router_dir) / MANIFEST).read_text())["generation"]
    except (OSError, ValueError, KeyError):
        return ""


def read_table(router_dir: str | Path) -> pa.Table:
    f = store_path(router_dir) / STORE_FILE
    return pq.read_table(f, schema=EVIDENCE_SCHEMA) if f.is_file() else EVIDENCE_SCHEMA.empty_table()


def load(router_dir: str | Path, *, dim: int | None = None) -> Evidence | None:
    """The store of ``router_dir`` (None when it has none or no rows)."""
    gen = generation(router_dir)
    t = read_table(router_dir)
    if t.num_rows == 0:
        return None
    qids = t.column("query_id").to_pylist()
    order = list(dict.fromkeys(qids))
    pos = {q: i for i, q in enumerate(order)}
    first = {}
    embs = t.column("embedding").to_pylist()
    for i, q in enumerate(qids):
        first.setdefault(q, i)
    emb = np.asarray([embs[first[q]] for q in order], dtype=np.float32)
    if dim is not None and emb.shape[1] != dim:
        raise EvidenceStoreError(f"evidence store of {router_dir}: embeddings of width {emb.shape[1]}, the router's are {dim}")
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    scores: dict[str, np.ndarray] = {}
    for q, m, s in zip(qids, t.column("model_id").to_pylist(), t.column("score").to_pylist()):
        col = scores.setdefault(m, np.full(len(order), np.nan))
        col[pos[q]] = s  # the latest row of a (query, model) wins
    return Evidence(emb, scores, gen)


def append(router_dir: str | Path, rows: pa.Table, *, max_queries: int = 20_000) -> dict:
    """Add ``rows`` (EVIDENCE_SCHEMA) to the store, keep the newest ``max_queries`` queries, write it
    (temporary name, then renamed) and a new manifest generation; returns the manifest."""
    d = store_path(router_dir)
    d.mkdir(parents=True, exist_ok=True)
    rows = rows.select(EVIDENCE_SCHEMA.names).cast(EVIDENCE_SCHEMA)
    t = pa.concat_tables([read_table(router_dir), rows])
    qids = t.column("query_id").to_pylist()
    last = {q: i for i, q in enumerate(qids)}  # a query's place: its newest row
    keep_q = set(sorted(last, key=last.get)[-max_queries:]) if max_queries > 0 else set()
    t = t.filter(pa.array([q in keep_q for q in qids]))
    tmp = d / f".{STORE_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(t, tmp)
    os.replace(tmp, d / STORE_FILE)
    manifest = {"generation": uuid.uuid4().hex, "rows": t.num_rows, "queries": len(keep_q), "max_queries": max_queries,
                "models": sorted(set(t.column("model_id").to_pylist())), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, d / MANIFEST)
    return manifest


def store_kernel(sim: np.ndarray, scores: np.ndarray, tau: float, *, partial: Partial = "cap", discount: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(E [Q, T], W [Q, T]): the weighted outcome sum and weight of each model's store rows for queries
    with cosine ``sim`` [Q, N] to them; ``scores`` [T, N] (NaN: no outcome). ``partial``: how outcomes
    that not every model has count (module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    q, t = sim.shape[0], scores.shape[0]
    if scores.shape[1] == 0 or t == 0:
        return np.zeros((q, t)), np.zeros((q, t))
    w = np.exp((np.asarray(sim, dtype=np.float64) - 1.0) / tau)  # [Q, N]
    known = ~np.isnan(scores)  # [T, N]
    full = known.all(axis=0)  # [N] rows every model has: counted as they are
    y = np.nan_to_num(scores)
    E = w[:, full] @ y[:, full].T
    W = np.broadcast_to(w[:, full].sum(axis=1, keepdims=True), (q, t)).copy()
    part = ~full
    if part.any():
        Ep = w[:, part] @ y[:, part].T  # [Q, T]
        Wp = w[:, part] @ known[:, part].T.astype(np.float64)
        if partial == "discount":
            Ep, Wp = discount * Ep, discount * Wp
        elif partial == "cap":
            if t < 2:
                Ep, Wp = np.zeros_like(Ep), np.zeros_like(Wp)
            else:
                top2 = np.sort(Wp, axis=1)[:, -2:]  # [Q, 2]
                other = np.where(Wp >= top2[:, 1:2], top2[:, 0:1], top2[:, 1:2])  # the most any other model has
                ratio = np.where(Wp > 0, np.minimum(1.0, other / np.maximum(Wp, 1e-300)), 0.0)
                Ep, Wp = Ep * ratio, Wp * ratio
        elif partial != "raw":
            raise EvidenceStoreError(f"partial must be cap, discount or raw, got {partial!r}")
        E, W = E + Ep, W + Wp
    return E, W


def combine(p: np.ndarray, mass: np.ndarray, E: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p' [Q, T], mass [Q, T]): the router's p [Q, T] worth its anchor mass S [Q], joined with the
    store's (E, W) [Q, T] (module docstring). Where W is 0 p and S pass unchanged."""
    S = np.asarray(mass, dtype=np.float64)[:, None]
    total = S + W
    out = np.where(total > 0, (S * p + E) / np.maximum(total, 1e-300), p)
    return np.clip(out, 0.0, 1.0), total
