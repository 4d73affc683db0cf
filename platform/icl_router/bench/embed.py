"""Embedding throughput: the Ray Data actor pool vs a plain single-process encode loop, same texts.

Both sides include loading the model (the pool loads one copy per actor; that
is part of its cost) and exclude starting Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

LLMROUTER_TRAIN = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "routing" / "llmrouter" / "train.jsonl"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1000, help="number of texts")
    p.add_argument("--num-actors", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--embedder", default="all-MiniLM-L6-v2")
    p.add_argument("--texts", default=str(LLMROUTER_TRAIN), help="llmrouter-style JSONL; generated texts if absent")
    p.add_argument("--address", default=None, help="Ray cluster address; default: a local cluster")


def load_texts(path: Path, n: int) -> tuple[list[str], str]:
    if path.is_file():
        with path.open() as f:
            texts = [json.loads(line)["question"] for _, line in zip(range(n), f)]
        return texts, str(path)
    rng = np.random.RandomState(0)
    words = "model query answer number list compute river city prime graph vector train test sum".split()
    return [" ".join(rng.choice(words, size=rng.randint(5, 60))) for _ in range(n)], "generated"


def run(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from icl_router import schemas as S
    from icl_router.config import EmbedConfig, RayConfig
    from icl_router.data.embed import embed_texts, load_embedder
    from icl_router.raycluster import ensure_ray

    texts, source = load_texts(Path(args.texts), args.n)
    table = pa.table({S.QUERY_ID: [str(i) for i in range(len(texts))], S.TEXT: texts})
    # The pool reads texts from ``table``, not from a dataset directory.
    cfg = EmbedConfig(dataset="-", embedder=args.embedder, batch_size=args.batch_size, num_actors=args.num_actors, ray=RayConfig(address=args.address))

    ensure_ray(cfg.ray)
    t0 = time.perf_counter()
    ids, ray_emb = embed_texts(table, cfg)  # [N, D]
    ray_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = load_embedder(args.embedder)
    t1 = time.perf_counter()
    plain_emb = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=cfg.normalize)  # [N, D]
    t2 = time.perf_counter()

    order = np.argsort(np.array(ids, dtype=np.int64))  # the pool returns rows in completion order
    return {
        "ray_texts_per_s": round(len(texts) / ray_s, 1),
        "plain_texts_per_s": round(len(texts) / (t2 - t0), 1),
        "ratio": round((t2 - t0) / ray_s, 3),
        "n_texts": len(texts),
        "num_actors": args.num_actors,
        "embedder": args.embedder,
        "timing": "model load included on both sides, ray.init excluded",
        "plain_encode_only_texts_per_s": round(len(texts) / (t2 - t1), 1),
        "max_abs_diff": float(np.abs(ray_emb[order] - plain_emb).max()),
        "texts": source,
        "cpus": os.cpu_count(),
    }
