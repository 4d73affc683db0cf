"""Read and write a dataset directory (docs/design.md §5) with pyarrow.

Writes never leave half a file behind: each file is written under a dotted
temporary name (ignored by readers) and renamed into place. Outcomes and
embeddings are append-only: every write adds new files and never rewrites old ones.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from icl_router import schemas
from icl_router.errors import UserError


class DatasetError(UserError):
    """A dataset directory or table that breaks the contract."""


def new_run_id() -> str:
    """Sorts by creation time (fixed-width hex nanoseconds), so file order is append order."""
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:6]}"


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def conform(table: pa.Table, schema: pa.Schema, *, what: str) -> pa.Table:
    """Select and cast ``table`` to ``schema``; missing nullable columns become nulls."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DatasetError(f"{what}: column {field.name!r} cannot be {field.type}: {e}") from None
        elif field.nullable:
            col = pa.nulls(len(table), field.type)
        else:
            raise DatasetError(f"{what}: required column {field.name!r} is missing (have {table.column_names})")
        if not field.nullable and col.null_count:
            raise DatasetError(f"{what}: column {field.name!r} has {col.null_count} null values; it is required")
        cols.append(col)
    return pa.table(cols, schema=schema)


def model_dir_name(model_id: str) -> str:
    return f"{schemas.MODEL_ID}={quote(model_id, safe='')}"


class Dataset:
    """A dataset directory: ``queries.parquet``, ``outcomes/``, ``embeddings/``, ``anchors.parquet``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r})"

    @property
    def queries_path(self) -> Path:
        return self.root / schemas.QUERIES_FILE

    @property
    def outcomes_dir(self) -> Path:
        return self.root / schemas.OUTCOMES_DIR

    @property
    def embeddings_dir(self) -> Path:
        return self.root / schemas.EMBEDDINGS_DIR

    @property
    def anchors_path(self) -> Path:
        return self.root / schemas.ANCHORS_FILE

    # -- queries -----------------------------------------------------------
    def read_queries(self) -> pa.Table:
        if not self.queries_path.is_file():
            raise DatasetError(
                f"{self.queries_path} not found: {self.root} is not a dataset; "
                "create one with `icl-router import` or `icl-router generate`"
            )
        return conform(pq.read_table(self.queries_path), schemas.QUERIES_SCHEMA, what=str(self.queries_path))

    def write_queries(self, table: pa.Table) -> None:
        table = conform(table, schemas.QUERIES_SCHEMA, what="queries")
        ids = table.column(schemas.QUERY_ID)
        if pc.count_distinct(ids).as_py() != len(ids):
            raise DatasetError("queries: query_id values must be unique")
        _write_atomic(table, self.queries_path)

    # -- outcomes ----------------------------------------------------------
    def _files(self, folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        return sorted(
            str(p) for p in folder.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
        )

    def read_outcomes(self, models: Iterable[str] | None = None) -> pa.Table:
        files = self._files(self.outcomes_dir)
        if models is not None:
            wanted = {model_dir_name(m) for m in models}
            files = [f for f in files if Path(f).relative_to(self.outcomes_dir).parts[0] in wanted]
        if not files:
            return schemas.OUTCOMES_SCHEMA.empty_table()
        table = pads.dataset(files, format="parquet", partitioning=None).to_table()
        return conform(table, schemas.OUTCOMES_SCHEMA, what=str(self.outcomes_dir))

    def model_ids(self) -> list[str]:
        return sorted(set(self.read_outcomes().column(schemas.MODEL_ID).to_pylist()))

    def append_outcomes(self, table: pa.Table, *, run_id: str | None = None) -> list[Path]:
        """Add outcome rows; one new file per model, never touching existing files."""
        table = conform(table, schemas.OUTCOMES_SCHEMA, what="outcomes")
        scores = table.column(schemas.SCORE)
        if len(table) and (pc.min(scores).as_py() < 0 or pc.max(scores).as_py() > 1):
            raise DatasetError("outcomes: score must lie in [0, 1]")
        run_id = run_id or new_run_id()
        written = []
        for model in pc.unique(table.column(schemas.MODEL_ID)).to_pylist():
            part = table.filter(pc.equal(table.column(schemas.MODEL_ID), model))
            path = self.outcomes_dir / model_dir_name(model) / f"part-{run_id}.parquet"
            if path.exists():
                raise DatasetError(f"{path} exists: run ids must be new for every append")
            _write_atomic(part, path)
            written.append(path)
        return written

    # -- embeddings --------------------------------------------------------
    def read_embeddings(self, embedder: str | None = None) -> pa.Table:
        """Embeddings (of one embedder if given); the first row per (query, embedder) wins."""
        files = self._files(self.embeddings_dir)
        if not files:
            return pa.table({schemas.QUERY_ID: pa.array([], pa.string()), schemas.EMBEDDING: pa.array([], pa.list_(pa.float32())), schemas.EMBEDDER: pa.array([], pa.string())})
        table = pads.dataset(files, format="parquet", partitioning=None).to_table()
        if embedder is not None:
            table = table.filter(pc.equal(table.column(schemas.EMBEDDER), embedder))
        keys = [f"{q}\x00{e}" for q, e in zip(table.column(schemas.QUERY_ID).to_pylist(), table.column(schemas.EMBEDDER).to_pylist())]
        _, first = np.unique(np.array(keys, dtype=object), return_index=True)
        return table.take(pa.array(np.sort(first)))

    def append_embeddings(self, table: pa.Table, *, run_id: str | None = None) -> Path:
        dim = len(table.column(schemas.EMBEDDING)[0]) if len(table) else 0
        table = conform(table, schemas.embeddings_schema(dim), what="embeddings")
        path = self.embeddings_dir / f"part-{run_id or new_run_id()}.parquet"
        _write_atomic(table, path)
        return path

    def embedding_matrix(self, query_ids: list[str], *, embedder: str) -> np.ndarray:
        """float32 [len(query_ids), dim] in the given order; every query must be embedded."""
        table = self.read_embeddings(embedder)
        index = {q: i for i, q in enumerate(table.column(schemas.QUERY_ID).to_pylist())}
        missing = [q for q in query_ids if q not in index]
        if missing:
            raise DatasetError(
                f"{len(missing)} queries have no {embedder!r} embedding (e.g. {missing[:3]}); "
                f"run `icl-router embed` with dataset={self.root} embedder={embedder}"
            )
        emb = table.column(schemas.EMBEDDING).combine_chunks()
        flat = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1)
        return np.ascontiguousarray(flat[[index[q] for q in query_ids]], dtype=np.float32)

    # -- anchors -----------------------------------------------------------
    def read_anchors(self) -> pa.Table:
        if not self.anchors_path.is_file():
            raise DatasetError(f"{self.anchors_path} not found; run `icl-router anchors` first")
        return conform(pq.read_table(self.anchors_path), schemas.ANCHORS_SCHEMA, what=str(self.anchors_path)).sort_by(schemas.POSITION)

    def write_anchors(self, table: pa.Table, path: Path | None = None) -> Path:
        path = path or self.anchors_path
        _write_atomic(conform(table, schemas.ANCHORS_SCHEMA, what="anchors"), path)
        return path

    def summary(self) -> dict:
        """Counts, tasks, splits and per-model accuracy: what to check after an import."""
        queries, outcomes = self.read_queries(), self.read_outcomes()
        models = outcomes.column(schemas.MODEL_ID).to_numpy(zero_copy_only=False)
        names, inverse = np.unique(models, return_inverse=True)
        correct = outcomes.column(schemas.CORRECT).to_numpy(zero_copy_only=False).astype(np.float64)
        accuracy = np.bincount(inverse, weights=correct, minlength=len(names)) / np.maximum(np.bincount(inverse, minlength=len(names)), 1)
        pairs = len(outcomes.group_by([schemas.QUERY_ID, schemas.MODEL_ID]).aggregate([]))
        count = lambda col: dict(sorted(Counter(queries.column(col).to_pylist()).items()))  # noqa: E731
        return {
            "dataset": str(self.root),
            "n_queries": len(queries),
            "n_models": len(names),
            "n_outcomes": len(outcomes),
            "n_missing_outcomes": len(queries) * len(names) - pairs,  # (query, model) cells without any outcome
            "tasks": count(schemas.TASK),
            "splits": count(schemas.SPLIT),
            "accuracy": {str(m): round(float(a), 4) for m, a in zip(names, accuracy)},
        }

    # -- dense views ---------------------------------------------------------
    def correctness(self, query_ids: list[str], models: list[str]) -> np.ndarray:
        """float32 [Q, M]: mean of ``correct`` over samples; NaN where no outcome exists."""
        return correctness_matrix(self.read_outcomes(models), query_ids, models)


def correctness_matrix(outcomes: pa.Table, query_ids: list[str], models: list[str], *, column: str = schemas.CORRECT) -> np.ndarray:
    q_index = {q: i for i, q in enumerate(query_ids)}
    m_index = {m: j for j, m in enumerate(models)}
    qs = outcomes.column(schemas.QUERY_ID).to_pylist()
    ms = outcomes.column(schemas.MODEL_ID).to_pylist()
    vals = outcomes.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    total = np.zeros((len(query_ids), len(models)))
    count = np.zeros((len(query_ids), len(models)))
    for q, m, v in zip(qs, ms, vals):
        i, j = q_index.get(q), m_index.get(m)
        if i is not None and j is not None:
            total[i, j] += v
            count[i, j] += 1
    with np.errstate(invalid="ignore"):
        return (total / count).astype(np.float32)


def write_dataset_atomically(root: str | Path, queries: pa.Table, outcomes: pa.Table, *, overwrite: bool = False) -> Dataset:
    """Write a whole new dataset beside ``root`` and rename it into place.

    If anything fails, ``root`` is untouched (absent, or the previous dataset).
    """
    root = Path(root)
    if root.exists() and not overwrite:
        raise DatasetError(f"{root} already exists; choose another --output or pass --overwrite")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{root.name}.staging-{new_run_id()}")
    try:
        ds = Dataset(staging)
        ds.write_queries(queries)
        ds.append_outcomes(outcomes, run_id="import")
        swap_into_place(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return Dataset(root)


def swap_into_place(staging: Path, path: Path) -> None:
    """Rename a fully written directory to ``path``; an old one there is moved aside first and
    deleted last, so ``path`` always holds a whole directory (the old or the new)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{new_run_id()}")
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)
