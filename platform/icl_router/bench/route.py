"""In-process routing cost: what an ingress replica pays to route one query itself, per configuration.

Each configuration is an embedder variant and a scoring path (routing/online.py) on the same
router directory and pool (its profiles.parquet). They take turns query by query, so all see
the same machine load; every text is distinct (the embedding cache never hits). The first
configuration is the reference: the others report how often they pick the same model and how
far their p moves from it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from icl_router.bench.serve import PROMPTS


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default="runs/demo/router", help="router directory (query_input vector)")
    p.add_argument("--configs", default="all-MiniLM-L6-v2:full,all-MiniLM-L6-v2@onnx:full,all-MiniLM-L6-v2:evidence,all-MiniLM-L6-v2@onnx:evidence",
                   help="comma-separated <embedder>:<full|evidence>; the first is the reference")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> dict:
    from icl_router.model.router_dir import PROFILES_FILE, read_meta, read_profiles
    from icl_router.routing.online import OnlineRouter

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled embedder never reaches for the hub
    configs = [tuple(c.rsplit(":", 1)) for c in args.configs.split(",") if c]
    pool = {m: p.tolist() for m, p in read_profiles(f"{args.router}/{PROFILES_FILE}", read_meta(args.router).anchor_query_ids).items()}
    routers = {}
    for emb, scoring in configs:
        r = OnlineRouter(args.router, embedder=emb, scoring=scoring, threads=args.threads)
        r.sync(pool)
        r.score(["warm up the router"])
        routers[f"{emb}:{scoring}"] = r
    names = list(routers)
    total = {n: [] for n in names}
    stage = {n: {"embed": [], "score": []} for n in names}
    ps = {n: [] for n in names}
    for i in range(args.queries):
        text = f"{PROMPTS[i % len(PROMPTS)]} (#{i})"  # distinct: the uncached path
        for n in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            s = routers[n].score([text])
            p, ms = s.p, s.ms
            total[n].append((time.perf_counter() - t0) * 1e3)
            stage[n]["embed"].append(ms["embed"])
            stage[n]["score"].append(ms["score"])
            ps[n].append(p[0])
    ref = np.array(ps[names[0]])  # [Q, T]
    out: dict = {"router": args.router, "models": len(pool), "k": len(read_meta(args.router).anchor_query_ids), "queries": args.queries,
                 "threads": args.threads, "reference": names[0], "configs": {}}
    for n in names:
        p = np.array(ps[n])
        out["configs"][n] = {
            "route_p50_ms": round(float(np.median(total[n])), 3),
            "route_p99_ms": round(float(np.percentile(total[n], 99)), 3),
            "embed_p50_ms": round(float(np.median(stage[n]["embed"])), 3),
            "score_p50_ms": round(float(np.median(stage[n]["score"])), 3),
            "same_choice_as_reference": round(float(np.mean(p.argmax(1) == ref.argmax(1))), 4),
            "max_abs_p_diff": float(np.abs(p - ref).max()),
        }
    out["cpus"] = os.cpu_count()
    return out
