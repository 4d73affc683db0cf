"""Stage-2 training steps: naive per-pair prompts vs shared-prefix packing, same pairs, one run.

Both sides start from the same router weights (the tiny router built here, or
``--router``: a router LM directory or hub id, e.g. runs/models/smollm2-135m-instruct,
loaded as training loads it), take the same batches (one
model's B pairs each) and do forward + backward + an AdamW step (the training
loop's optimiser, ``train.loop.make_optimizer``); the losses of the
two trajectories must agree (``max_loss_diff``).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, get_args

from icl_router.kinds import ProfileLayout, QueryInput

WORDS = (
    "what which how many find the value of given a number sum product prime integer triangle area "
    "explain why does water boil at sea level city capital country river history war year author "
    "book write function returns list string sorted python code energy force mass velocity cell "
    "protein gene chemical reaction acid base temperature pressure probability random choose answer"
).split()


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=500, help="number of anchors (profile length)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (all of one model)")
    p.add_argument("--layout", choices=get_args(ProfileLayout), default="pairs", help="profile layout")
    p.add_argument("--query-input", choices=get_args(QueryInput), default="text")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    p.add_argument("--query-words", type=int, default=40, help="mean words per synthetic query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core machine)")
    p.add_argument("--router", help="a router LM directory or hub id (default: the tiny router built from the queries)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from icl_router.config import PhaseConfig, TrainConfig
    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.tiny import build_tiny_router_lm, load_router_lm
    from icl_router.train.loop import PlainEngine, make_optimizer
    from icl_router.train.steps import collate_stage2, stage2_loss

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n_models, emb_dim, B = 4, 384, args.batch_size
    n_q = B * (args.steps + 1)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(args.query_words // 2, args.query_words * 3 // 2 + 1))) + "?" for _ in range(n_q)]
    lm, tok = load_router_lm(args.router) if args.router else build_tiny_router_lm(texts, seed=args.seed)
    layout = PromptLayout(tok, query_input=args.query_input, profile_layout=args.layout)
    torch.manual_seed(args.seed)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(args.k, emb_dim))
    profiles = torch.rand(n_models, args.k) < 0.6
    query_emb = torch.randn(n_q, emb_dim)
    batches = []
    for s in range(args.steps + 1):
        sl = slice(s * B, (s + 1) * B)
        batches.append(
            collate_stage2(
                layout,
                texts[sl],
                model_idx=[s % n_models] * B,
                profiles=profiles,
                target=torch.from_numpy(rng.random(B) < 0.5).float(),
                query_emb=query_emb[sl],
            )
        )

    cfg = TrainConfig(stage=2, dataset="<bench>", output="<bench>", phases=[PhaseConfig(lr_projector=1e-4, lr_router=1e-4)])

    def side(shared: bool) -> tuple[float, list[float]]:
        r = copy.deepcopy(router)
        engine = PlainEngine(r, make_optimizer(r, cfg), clip=0.0)

        def step(batch: Any) -> float:
            loss = stage2_loss(r, batch, shared=shared)
            engine.backward(loss)
            engine.step()
            return float(loss.detach())

        losses = [step(batches[0])]  # warm-up, not timed
        t0 = time.perf_counter()
        losses += [step(b) for b in batches[1:]]
        return time.perf_counter() - t0, losses

    t_naive, l_naive = side(False)
    t_shared, l_shared = side(True)
    pairs = args.steps * B
    suffix_len = float(torch.cat([b.pairs.suffix_len for b in batches]).float().mean())
    return {
        "naive_pairs_per_s": round(pairs / t_naive, 2),
        "shared_pairs_per_s": round(pairs / t_shared, 2),
        "speedup": round(t_naive / t_shared, 2),
        "max_loss_diff": max(abs(a - b) for a, b in zip(l_naive, l_shared)),
        "router": args.router or "tiny",
        "router_parameters": sum(p.numel() for p in lm.parameters()),
        "K": args.k,
        "batch_size": B,
        "layout": args.layout,
        "query_input": args.query_input,
        "steps": args.steps,
        "prefix_tokens": int(router.prefix_ids.numel()),
        "suffix_tokens_mean": round(suffix_len, 1),
        "torch_threads": torch.get_num_threads(),
    }
