"""Embedding benchmarks, both sides in one run.

``--mode pool`` (default): throughput of the Ray Data actor pool vs a plain single-process
encode loop, same texts. Both sides include loading the model (the pool loads one copy per
actor; that is part of its cost) and exclude starting Ray.

``--mode variants``: per-query latency of embedder variants (data/embedder.py) beside the
reference (``--embedder``), one thread each, at batch sizes 1 and up, the variants taking
turns batch by batch so all see the same machine load; and each variant's cosine to the
reference's vectors on the same texts.
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
    p.add_argument("--texts", default=str(LLMROUTER_TRAIN), help="llmrouter-style JSONL; 'prompts': bench serve's short prompts, numbered; generated texts if absent")
    p.add_argument("--address", default=None, help="Ray cluster address; default: a local cluster")
    p.add_argument("--mode", choices=["pool", "variants"], default="pool")
    p.add_argument("--variants", default="all-MiniLM-L6-v2@onnx,all-MiniLM-L6-v2@onnx-int8,all-MiniLM-L6-v2@static",
                   help="--mode variants: comma-separated embedder names to set beside --embedder")
    p.add_argument("--batch-sizes", default="1,4,16", help="--mode variants: comma-separated")
    p.add_argument("--threads", type=int, default=1, help="--mode variants: torch / ONNX Runtime intra-op threads")


def load_texts(path: Path, n: int, *, spread: bool = False) -> tuple[list[str], str]:
    """The first ``n`` questions of ``path`` (``spread``: ``n`` spaced evenly over the file, every task's share)."""
    if str(path) == "prompts":  # what bench serve sends: short chat prompts, each text distinct
        from icl_router.bench.serve import PROMPTS

        return [f"{PROMPTS[i % len(PROMPTS)]} (#{i})" for i in range(n)], "bench serve prompts"
    if path.is_file():
        with path.open() as f:
            if spread:
                lines = f.readlines()
                texts = [json.loads(lines[i])["question"] for i in np.linspace(0, len(lines) - 1, min(n, len(lines))).astype(int)]
            else:
                texts = [json.loads(line)["question"] for _, line in zip(range(n), f)]
        return texts, str(path)
    rng = np.random.RandomState(0)
    words = "model query answer number list compute river city prime graph vector train test sum".split()
    return [" ".join(rng.choice(words, size=rng.randint(5, 60))) for _ in range(n)], "generated"


def run(args: argparse.Namespace) -> dict:
    return run_variants(args) if args.mode == "variants" else run_pool(args)


def run_variants(args: argparse.Namespace) -> dict:
    import torch

    from icl_router.data.embedder import BUNDLED, load_embedder, parse_embedder

    names = [args.embedder, *[v for v in args.variants.split(",") if v and v != args.embedder]]
    if any(parse_embedder(n).model == BUNDLED for n in names):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model never reaches for the hub
    torch.set_num_threads(args.threads)
    texts, source = load_texts(Path(args.texts), args.n, spread=True)
    models, load_s = {}, {}
    for n in names:
        t0 = time.perf_counter()
        models[n] = load_embedder(n, threads=args.threads)  # a derived variant is built on first use (not timed here)
        load_s[n] = time.perf_counter() - t0
    vecs = {n: m.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True) for n, m in models.items()}  # [N, D]
    ref = vecs[args.embedder]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    per_query: dict[str, dict[int, list[float]]] = {n: {b: [] for b in sizes} for n in names}
    for b in sizes:
        for lo in range(0, len(texts) - b + 1, b):
            chunk = texts[lo : lo + b]
            for n in names if (lo // b) % 2 == 0 else names[::-1]:  # alternate who goes first
                t0 = time.perf_counter()
                models[n].encode(chunk, batch_size=b, normalize_embeddings=True, convert_to_numpy=True)
                per_query[n][b].append((time.perf_counter() - t0) * 1e3 / b)
    words = [len(t.split()) for t in texts]
    out: dict = {"reference": args.embedder, "n_texts": len(texts), "texts": source, "words_p50": float(np.median(words)),
                 "threads": args.threads, "batch_sizes": sizes, "variants": {}}
    for n in names:
        cos = (vecs[n] * ref).sum(1) if vecs[n].shape == ref.shape else np.full(len(texts), np.nan)
        out["variants"][n] = {
            **{f"ms_per_query_b{b}_p50": round(float(np.median(per_query[n][b])), 3) for b in sizes},
            **{f"ms_per_query_b{b}_p99": round(float(np.percentile(per_query[n][b], 99)), 3) for b in sizes},
            "cosine_to_reference_mean": round(float(np.mean(cos)), 6),
            "cosine_to_reference_min": round(float(np.min(cos)), 6),
            "max_abs_diff": float(np.abs(vecs[n] - ref).max()) if vecs[n].shape == ref.shape else None,
            "load_s": round(load_s[n], 2),
        }
    b0 = sizes[0]
    base = out["variants"][args.embedder][f"ms_per_query_b{b0}_p50"]
    for n in names:
        out["variants"][n][f"speedup_b{b0}_p50"] = round(base / out["variants"][n][f"ms_per_query_b{b0}_p50"], 2)
    out["cpus"] = os.cpu_count()
    return out


def run_pool(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from icl_router import schemas
    from icl_router.config import EmbedConfig, RayConfig
    from icl_router.data.embed import embed_texts
    from icl_router.data.embedder import load_embedder
    from icl_router.raycluster import ensure_ray

    texts, source = load_texts(Path(args.texts), args.n)
    table = pa.table({schemas.QUERY_ID: [str(i) for i in range(len(texts))], schemas.TEXT: texts})
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
