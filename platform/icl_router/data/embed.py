"""``icl-router embed``: embed queries with sentence-transformers on a Ray Data actor pool.

Each run embeds only the queries that have no embedding from the configured
embedder yet, and adds one new file to ``embeddings/`` (append-only). The
embedders themselves (names, variants, loading) are ``data/embedder.py``.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import pyarrow as pa

from icl_router import schemas
from icl_router.config import EmbedConfig
from icl_router.data.dataset import Dataset, DatasetError
from icl_router.data.embedder import BUNDLED, load_embedder, parse_embedder
from icl_router.raycluster import ensure_ray


class Embedder:
    """Ray Data actor: holds one model, turns batches of texts into vectors."""

    def __init__(self, name: str, *, batch_size: int, normalize: bool, max_seq_length: int | None):
        if parse_embedder(name).model == BUNDLED:
            # Set before sentence-transformers / huggingface_hub are imported in this process:
            # the bundled model must never reach for the hub (there is no network).
            os.environ["HF_HUB_OFFLINE"] = "1"
        self.model = load_embedder(name, max_seq_length=max_seq_length)
        self.batch_size = batch_size
        self.normalize = normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.model.encode(
            list(batch[schemas.TEXT]), batch_size=self.batch_size, normalize_embeddings=self.normalize, convert_to_numpy=True
        )  # [B, D]
        return {schemas.QUERY_ID: batch[schemas.QUERY_ID], schemas.EMBEDDING: emb.astype(np.float32)}


def embed_texts(table: pa.Table, cfg: EmbedConfig) -> tuple[list[str], np.ndarray]:
    """Run the actor pool over ``table`` (query_id, text); returns ids and float32 [N, D] in output order."""
    import ray

    # Several blocks per actor: one block goes to one actor, and the last blocks decide the tail.
    rows_per_block = max(1, min(cfg.batch_size * 8, math.ceil(len(table) / (4 * cfg.num_actors))))
    blocks = [table.slice(i, rows_per_block) for i in range(0, len(table), rows_per_block)]
    ds = ray.data.from_arrow(blocks).map_batches(
        Embedder,
        fn_constructor_kwargs=dict(
            name=cfg.embedder, batch_size=cfg.batch_size, normalize=cfg.normalize, max_seq_length=cfg.max_seq_length
        ),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    ids: list[str] = []
    embs: list[np.ndarray] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids.extend(batch[schemas.QUERY_ID].tolist())
        embs.append(np.asarray(batch[schemas.EMBEDDING], dtype=np.float32))
    return ids, np.concatenate(embs)


def run_embed(cfg: EmbedConfig) -> dict:
    ds = Dataset(cfg.dataset)
    queries = ds.read_queries()
    existing = ds.read_embeddings(cfg.embedder)
    done = set(existing.column(schemas.QUERY_ID).to_pylist())
    todo = queries.filter(pa.array([q not in done for q in queries.column(schemas.QUERY_ID).to_pylist()], pa.bool_()))
    todo = todo.select([schemas.QUERY_ID, schemas.TEXT])
    old_dim = len(existing.column(schemas.EMBEDDING)[0]) if len(existing) else None
    print(f"embed: {len(todo)} queries to embed with {cfg.embedder!r}, {len(done)} already embedded", file=sys.stderr, flush=True)
    summary = {"embedder": cfg.embedder, "embedded": 0, "skipped": len(queries) - len(todo), "dim": old_dim, "seconds": 0.0, "texts_per_s": None}
    if len(todo) == 0:
        return summary

    ensure_ray(cfg.ray)
    t0 = time.perf_counter()
    ids, emb = embed_texts(todo, cfg)  # emb: [N, D]
    seconds = time.perf_counter() - t0
    dim = emb.shape[1]
    if old_dim is not None and dim != old_dim:
        raise DatasetError(
            f"embedder {cfg.embedder!r} now gives {dim}-d vectors but {ds.embeddings_dir} holds {old_dim}-d ones "
            "under the same name; give the new model another `embedder` name"
        )
    table = pa.table(
        {
            schemas.QUERY_ID: pa.array(ids, pa.string()),
            schemas.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
            schemas.EMBEDDER: pa.array([cfg.embedder] * len(ids), pa.string()),
        }
    )
    path = ds.append_embeddings(table)
    print(f"embed: wrote {len(ids)} {dim}-d embeddings to {path} in {seconds:.1f} s", file=sys.stderr, flush=True)
    summary.update(embedded=len(ids), dim=dim, seconds=round(seconds, 3), texts_per_s=round(len(ids) / seconds, 1), output=str(path))
    return summary
