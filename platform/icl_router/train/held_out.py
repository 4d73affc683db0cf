"""The one decision fit of a trained router (docs/design.md §3), for the train job and evaluation alike.

The decision layer is fitted on the held-out queries: every train query that is not an anchor,
whichever step the keep-or-not rule kept. Each must be scored by a router that trained on
nothing of it, so the layer sees p as a new query would get it:

- the queries the kept router never trained on (all of them when the untrained router, step 0,
  is kept; the validation slice and any query the kept steps never drew otherwise) are scored
  by the kept router;
- the queries the kept router did train on are cross-fitted: they are cut into ``folds`` folds
  and each fold is scored by a fold router, trained as the kept one was (same config, data and
  number of steps) without that fold's queries.

So a router whose kept step is not 0 gets its layer fitted on as many queries as one whose kept
step is 0. With ``folds: 0`` the trained-on queries are left out instead (cheaper, fewer rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from icl_router.config import DecisionFitConfig, TrainStepsConfig
from icl_router.data.routing_set import RoutingSet
from icl_router.routing.decision import DecisionError, DecisionParams, View
from icl_router.routing.decision_fit import anchor_query_groups, fit_on_views, router_views
from icl_router.train.data import TrainData

FoldRouter = Callable[[np.ndarray], Any]  # query rows to leave out -> a router trained as the kept one, without them


@dataclass(frozen=True)
class HeldOutFit:
    """A fitted decision layer and the rows it saw."""

    params: DecisionParams
    rows: int  # held-out queries the layer was fitted on
    by_kept: int  # of them, scored by the kept router (it trained on none of them)
    by_folds: int  # of them, scored by fold routers (the kept router trained on them)
    folds: int  # fold routers trained

    def summary(self) -> dict[str, int]:
        return {"decision_rows": self.rows, "decision_rows_kept": self.by_kept, "decision_rows_folds": self.by_folds, "decision_folds": self.folds}


def held_out_rows(rs: RoutingSet) -> np.ndarray:
    """Every train query that is not an anchor: what the decision layer is fitted on."""
    train = rs.rows("train")
    return train[~np.isin(train, rs.anchor_rows)]


def rows_trained(cfg: TrainStepsConfig, data: TrainData, *, steps: int, world: int = 1) -> np.ndarray:
    """The query rows of the items in the first ``steps`` optimiser steps of the schedule, on every rank."""
    from icl_router.train.loop import epoch_batches, total_steps

    n_total, epochs = total_steps(cfg, data, world=world)
    steps = min(steps, n_total)
    seen: list[np.ndarray] = []
    for e in range(len(epochs)):
        if steps <= 0:
            break
        per_rank = [epoch_batches(cfg, data, epoch=e, rank=r, world=world)[:steps] for r in range(world)]
        seen += [data.rows[idx] for batches in per_rank for idx in batches]
        steps -= max(len(b) for b in per_rank)
    return np.unique(np.concatenate(seen)) if seen else np.zeros(0, dtype=np.int64)


def fold_trainer(cfg: TrainStepsConfig, data: TrainData, *, steps: int, init_dir: str | None, device: Any = "cpu") -> FoldRouter:
    """Fold routers for ``fit_decision_on_held_out``: each trains ``steps`` steps of ``cfg`` in this
    process (``train.loop``, no DeepSpeed) on ``data`` without the items of the rows it is given."""

    def train(leave_out: np.ndarray) -> Any:
        import torch

        from icl_router.train.loop import PlainEngine, build_router, make_optimizer, train_steps

        torch.manual_seed(cfg.seed)
        router = build_router(cfg, anchor_emb=data.anchor_emb, init_dir=init_dir, device=device)
        engine = PlainEngine(router, make_optimizer(router, cfg), clip=cfg.deepspeed.gradient_clipping)
        fold_data = replace(data, items=data.items[~np.isin(data.rows, leave_out)])
        for _ in train_steps(cfg.model_copy(update={"max_steps": steps}), engine, fold_data):
            pass
        return router.eval()

    return train


def fit_decision_on_held_out(
    router: Any,
    rs: RoutingSet,
    *,
    cols: list[int],
    decision: DecisionFitConfig,
    max_text_tokens: int,
    seed: int = 0,
    trained_on: np.ndarray | None = None,
    fold_router: FoldRouter | None = None,
) -> HeldOutFit:
    """The decision layer of the kept ``router`` for the pool ``cols`` (columns of ``rs``), fitted on every
    held-out query (``held_out_rows``). ``trained_on``: the query rows the kept router trained on (none
    when step 0 is kept); those are scored by ``fold_router``s, ``decision.folds`` of them (or left out).
    With ``decision.default: held_out`` the guard's default is the pool's best model on those queries."""
    held = held_out_rows(rs)
    seen = np.intersect1d(held, trained_on) if trained_on is not None else np.zeros(0, dtype=np.int64)
    folds = min(decision.folds, len(seen)) if fold_router is not None else 0
    parts = [(router, np.setdiff1d(held, seen))]
    if folds:
        assign = np.random.default_rng(seed + 13).permutation(len(seen)) % folds
        parts += [(fold_router(seen[assign == f]), seen[assign == f]) for f in range(folds)]
    parts = [(r, rows) for r, rows in parts if len(rows)]
    if not parts:
        raise DecisionError("the decision layer needs held-out train queries (train queries that are not anchors); the split has none")
    rows = np.concatenate([p[1] for p in parts])
    profiles = rs.profiles([rs.models[c] for c in cols])
    anchor_emb = router.anchor_emb.detach().float().cpu().numpy()
    groups = anchor_query_groups(anchor_emb, rs.embeddings[rows], clusters=decision.clusters, seed=seed)
    views = _joined_views(parts, rs, profiles=profiles, groups=groups, max_text_tokens=max_text_tokens)
    params = fit_on_views(
        views, labels=rs.labels[rows][:, cols], profiles=profiles, models=[rs.models[c] for c in cols],
        query_tasks=[rs.tasks[i] for i in rows] if decision.tasks else None, anchor_tasks=[rs.tasks[i] for i in rs.anchor_rows],
        default=decision.default,
    )
    by_kept = len(parts[0][1]) if parts and parts[0][0] is router else 0
    return HeldOutFit(params, rows=len(rows), by_kept=by_kept, by_folds=len(rows) - by_kept, folds=folds)


def _joined_views(parts: list[tuple[Any, np.ndarray]], rs: RoutingSet, *, profiles: np.ndarray, groups: tuple[np.ndarray, np.ndarray],
                  max_text_tokens: int) -> list[View]:
    """The views of each (router, rows) part, joined row-wise in the order of ``parts``."""
    g_anchor, g_query = groups
    per_part, start = [], 0
    for r, rows in parts:
        part_groups = (g_anchor, g_query[start : start + len(rows)])
        start += len(rows)
        per_part.append(router_views(r, texts=query_texts(r, rs, rows, max_text_tokens=max_text_tokens), query_emb=rs.embeddings[rows],
                                     profiles=profiles, groups=part_groups))
    n_views = min(len(v) for v in per_part)  # every part's router has the evidence head or none has
    return [View(np.concatenate([v[i].p for v in per_part]), np.concatenate([v[i].sim for v in per_part])) for i in range(n_views)]


def query_texts(router: Any, rs: RoutingSet, rows: np.ndarray, *, max_text_tokens: int) -> list[str]:
    """What the router reads of each query's text: nothing for a vector router, the cut text otherwise."""
    if router.layout.query_input == "vector":
        return [""] * len(rows)
    from icl_router.train.loop import truncate_texts

    return truncate_texts([rs.texts[j] for j in rows], router.layout.tokenizer, max_tokens=max_text_tokens)
