"""Scoring: the full forward per (query, model) pair vs the cached batched scorer, same router, one run.

Naive side: for each query, ``forward_pairs`` over its T pairs (one batch; every
prefix recomputed), as the authors' inference does. Cached side: ``Scorer``
(``--forward shared``: its own Qwen2 forward; ``packed``: transformers' with packed rows)
with each model's prefix cache built once (its build time is reported apart,
paid once per registered model), all queries scored against all T models.
qps = queries routed per second over all T models (wall time); ``speedup_cpu_time``
is the same ratio in process CPU time, steadier when other work shares the cores.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, get_args

from icl_router.bench.train_batching import WORDS
from icl_router.kinds import ProfileLayout, QueryInput


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=500, help="number of anchors (profile length)")
    p.add_argument("--t", type=int, default=9, help="number of models in the pool")
    p.add_argument("--queries", type=int, default=32, help="queries routed on each side")
    p.add_argument("--layout", choices=get_args(ProfileLayout), default="pairs", help="profile layout")
    p.add_argument("--query-input", choices=get_args(QueryInput), default="vector")
    p.add_argument("--anchor-evidence", action="store_true", help="the router adds the anchor-evidence logit (vector queries)")
    p.add_argument("--max-rows", type=int, default=64, help="scorer: rows per forward (bounds memory)")
    p.add_argument("--pack", type=int, default=32, help="scorer: queries per forward = max(1, max_rows // T) * pack; packed: suffixes per row")
    p.add_argument(
        "--forward", choices=["shared", "packed"], default="shared", help="scorer path: the custom Qwen2/Llama forward or transformers' (packed rows)"
    )
    p.add_argument("--query-words", type=int, default=40, help="mean words per synthetic query")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter, Pairs, pad_ids
    from icl_router.model.tiny import build_tiny_router_lm
    from icl_router.routing.scorer import Scorer

    rng = np.random.default_rng(args.seed)
    T, Q, emb_dim = args.t, args.queries, 384
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(args.query_words // 2, args.query_words * 3 // 2 + 1))) + "?" for _ in range(Q)]
    lm, tok = build_tiny_router_lm(texts, seed=args.seed)
    torch.manual_seed(args.seed)
    router = ICLRouter(lm, PromptLayout(tok, query_input=args.query_input, profile_layout=args.layout), anchor_emb=torch.randn(args.k, emb_dim), anchor_evidence=args.anchor_evidence).eval()
    profiles = torch.rand(T, args.k) < 0.6  # [T, K]
    query_emb = torch.randn(Q, emb_dim)
    pool = {f"model-{t}": profiles[t].numpy() for t in range(T)}

    # naive: one batch of T full prompts per query
    pad = lm.config.pad_token_id or 0
    naive = torch.empty(Q, T)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids, lens = pad_ids([router.layout.suffix(text).ids] * T, pad)
            pairs = Pairs(profiles, torch.arange(T), ids, lens, query_emb[i].expand(T, -1))
            naive[i] = torch.sigmoid(router.forward_pairs(pairs).float())
    t_naive, c_naive = time.perf_counter() - t0, time.process_time() - c0

    t0 = time.perf_counter()
    scorer = Scorer(router, pool, max_rows=args.max_rows, pack=args.pack)
    scorer.shared_attention = scorer.shared_attention and args.forward == "shared"
    scorer.score(texts[:1], query_emb=query_emb[:1])  # stacks the caches once, as the first request would
    t_build = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    cached = scorer.score(texts, query_emb=query_emb)
    t_cached, c_cached = time.perf_counter() - t0, time.process_time() - c0

    suffix_len = np.mean([len(router.layout.suffix(t).ids) for t in texts])
    return {
        "naive_qps": round(Q / t_naive, 2),
        "cached_qps": round(Q / t_cached, 2),
        "speedup": round(t_naive / t_cached, 2),
        "max_abs_diff": float(np.abs(cached - naive.numpy()).max()),
        "K": args.k,
        "T": T,
        "queries": Q,
        "layout": args.layout,
        "query_input": args.query_input,
        "anchor_evidence": args.anchor_evidence,
        "speedup_cpu_time": round(c_naive / c_cached, 2),  # process CPU time: steadier than wall time on a shared machine
        "cache_build_s": round(t_build, 3),
        "cache_build_s_per_model": round(t_build / T, 3),
        "max_rows": args.max_rows,
        "pack": args.pack,
        "forward": "shared" if scorer.shared_attention else "packed",
        "prefix_tokens": int(router.prefix_ids.numel()),
        "suffix_tokens_mean": round(float(suffix_len), 1),
        "torch_threads": torch.get_num_threads(),
    }
