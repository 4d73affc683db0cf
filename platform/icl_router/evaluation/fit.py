"""Train and score routers in one process, for evaluation and sweeps.

The same training data, schedule, losses and optimiser as the Ray Train job
(``train.data``, ``train.loop``), plus what evaluation needs around them: anchors
on a seed's train split, a validation slice of train for picking the step (early
stopping), and scoring through ``routing.Scorer``, as the service scores.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl_router.config import SplitConfig, TrainStepsConfig
from icl_router.data.anchors import select_anchors
from icl_router.data.routing_set import RoutingSet
from icl_router.data.splits import make_split
from icl_router.evaluation.baselines import earliest_within_se, routed_hits
from icl_router.train.data import TrainData


def for_seed(rs: RoutingSet, queries: Any, split: SplitConfig, *, seed: int, k: int) -> RoutingSet:
    """The routing set with this seed's split and K anchors picked on its train part."""
    sp = make_split(queries, split.model_copy(update={"seed": seed}))
    rs = dataclasses.replace(rs, split=sp, anchor_ids=[])
    train = rs.rows("train")
    table = select_anchors(rs.labels[train], [rs.query_ids[i] for i in train], k=k, seed=seed)
    return dataclasses.replace(rs, anchor_ids=table.column("query_id").to_pylist())


def tiny_init(cfg: TrainStepsConfig, texts: list[str], cache: Path) -> str:
    """A fresh tiny LM + tokenizer saved under ``cache`` (one per shape, vocab and seed)."""
    from icl_router.train.driver import build_tiny_init

    t = cfg.router.tiny
    path = cache / f"tiny-h{t.hidden_size}-l{t.num_hidden_layers}-a{t.num_attention_heads}-v{t.vocab_size}-s{cfg.seed}"
    if not (path / "config.json").exists():
        build_tiny_init(cfg, texts, path)
    return str(path)


def score(router: Any, rs: RoutingSet, rows: np.ndarray, profiles: np.ndarray, *, max_text_tokens: int = 64) -> np.ndarray:
    """p(correct) [len(rows), T] of the routing set's ``rows`` against T bool profiles [T, K],
    through ``routing.Scorer`` (the service's scorer); query texts are cut as training cut them."""
    from icl_router.routing.scorer import Scorer
    from icl_router.train.loop import truncate_texts

    scorer = Scorer(router, {f"model-{t}": p for t, p in enumerate(profiles)})
    if router.layout.query_input == "vector":
        return scorer.score([""] * len(rows), query_emb=rs.embeddings[rows])  # the suffix holds the vector, not the text
    texts = truncate_texts([rs.texts[j] for j in rows], router.layout.tokenizer, max_tokens=max_text_tokens)
    return scorer.score(texts)


def fit(
    cfg: TrainStepsConfig,
    data: TrainData,
    *,
    init_dir: str,
    rs: RoutingSet | None = None,
    val: np.ndarray | None = None,
    eval_every: int = 200,
    label: str = "train",
) -> tuple[Any, dict[str, Any]]:
    """Train (``train.loop`` steps); with ``rs`` and ``val`` rows, keep the weights of the
    evaluation (at step 0, every ``eval_every`` steps and at the end) that routes val best, the
    earliest within one standard error of the best (``baselines.earliest_within_se``)."""
    from icl_router.train.loop import PlainEngine, build_router, make_optimizer, train_steps

    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")  # train_config resolved the device rule
    router = build_router(cfg, anchor_emb=data.anchor_emb, init_dir=init_dir, device=device)
    engine = PlainEngine(router, make_optimizer(router, cfg), clip=cfg.deepspeed.gradient_clipping)
    val_labels = None if val is None else rs.labels[val][:, [rs.models.index(m) for m in data.models]]
    checks: list[tuple[int, np.ndarray, dict]] = []  # (step, hits [V], weights) of every evaluation: the pick needs them all
    t0, losses, step = time.perf_counter(), [], 0

    def check(step: int) -> None:
        hits = routed_hits(score(router, rs, val, data.profiles, max_text_tokens=cfg.max_text_tokens), val_labels)
        checks.append((step, hits, copy.deepcopy(router.state_dict())))
        router.train()

    def best_so_far() -> str:
        s, h, _ = max(checks, key=lambda c: np.nanmean(c[1]))
        return f" val best {100 * np.nanmean(h):.1f}@{s}"

    if val is not None:
        check(0)  # fine-tuning may not beat the router it starts from, nor training the anchor evidence's kNN
    for r in train_steps(cfg, engine, data):
        losses.append(r.loss)
        step = r.step
        if r.step % 50 == 0 or r.step == r.total:
            sys.stderr.write(
                f"\r[{label}] step {r.step}/{r.total} epoch {r.epoch}/{r.epochs} loss {np.mean(losses[-50:]):.4f} "
                f"{time.perf_counter() - t0:.0f}s" + (best_so_far() if checks else "")
            )
            sys.stderr.flush()
        if val is not None and r.step % eval_every == 0:
            check(r.step)
    if val is not None and checks[-1][0] != step:
        check(step)
    sys.stderr.write("\n")
    info = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "final_loss": float(np.mean(losses[-50:])) if losses else None}
    if checks:
        kept_step, hits, weights = checks[earliest_within_se([h for _, h, _ in checks])]
        router.load_state_dict(weights)
        curve = [(s, round(100 * float(np.nanmean(h)), 2)) for s, h, _ in checks]
        info.update(val_acc=round(100 * float(np.nanmean(hits)), 2), kept_step=kept_step, val_curve=curve)
    return router.eval(), info
