"""Anchor selection: the K queries every model's capability profile is measured on.

The paper's rule (appendix A.3: 8 models, 125 anchors from each of the strata
"exactly 1, 2, 3, 4 models correct") generalised to a pool of M models: the
strata are "exactly s models correct" for s = 1..M-1 (queries all models got
right or all got wrong tell models apart on nothing and are excluded); each
stratum gives k // (M-1) anchors, the lowest strata one more each until k is
reached. A stratum with fewer queries than its share gives all it has and the
rest is shared out among the strata that have more (large pools, where one
model dominates, leave some strata nearly empty). Only the train part of the
split is eligible, and only queries with an outcome for every model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from icl_router import schemas
from icl_router.config import AnchorsConfig, ConfigError
from icl_router.data.dataset import Dataset
from icl_router.data.splits import make_split


def select_anchors(correct: np.ndarray, query_ids: list[str], *, k: int, seed: int) -> pa.Table:
    """Anchors as a table (query_id, position, n_correct), ordered by stratum, then by ``query_ids`` order.

    ``correct``: [Q, M], bool or the mean of ``correct`` over samples (counted
    correct at >= 0.5); NaN where a model has no outcome (that query is not eligible).
    """
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or correct.shape[0] != len(query_ids):
        raise ValueError(f"correct must be [len(query_ids)={len(query_ids)}, M], got shape {correct.shape}")
    n_models = correct.shape[1]
    if n_models < 2:
        raise ConfigError(f"anchors need at least 2 models with outcomes to form strata, found {n_models}")
    if k < 1:
        raise ConfigError(f"k={k}: the number of anchors must be at least 1")
    complete = ~np.isnan(correct).any(axis=1)  # [Q]
    n_correct = np.where(complete, (np.nan_to_num(correct) >= schemas.CORRECT_THRESHOLD).sum(axis=1), -1)  # [Q]

    strata = list(range(1, n_models))
    have = np.array([int((n_correct == s).sum()) for s in strata])
    if have.sum() < k:
        raise ConfigError(
            f"k={k}: only {int(have.sum())} train queries tell models apart (some but not all of the {n_models} models "
            f"right; strata 1..{n_models - 1} have {have.tolist()}); use k <= {int(have.sum())} or add train queries"
        )
    quota = stratum_quota(have, k)
    rng = np.random.default_rng(seed)
    chosen = [np.sort(rng.choice(np.flatnonzero(n_correct == s), size=int(q), replace=False)) for s, q in zip(strata, quota)]
    rows = np.concatenate(chosen)
    return pa.table(
        {
            schemas.QUERY_ID: pa.array([query_ids[i] for i in rows], pa.string()),
            schemas.POSITION: pa.array(np.arange(len(rows)), pa.int32()),
            schemas.N_CORRECT: pa.array(n_correct[rows], pa.int32()),
        },
        schema=schemas.ANCHORS_SCHEMA,
    )


def stratum_quota(have: np.ndarray, k: int) -> np.ndarray:
    """Anchors per stratum [S]: equal shares (the lowest strata one more), each capped at what
    the stratum has (``have`` [S]), the shortfall shared out again among the others."""
    quota = np.zeros_like(have)
    open_ = have > 0
    left = k
    while left > 0 and open_.any():
        idx = np.flatnonzero(open_)
        base, extra = divmod(left, len(idx))
        share = np.full(len(idx), base) + (np.arange(len(idx)) < extra)
        take = np.minimum(share, have[idx] - quota[idx])
        quota[idx] += take
        left -= int(take.sum())
        open_ = quota < have
    return quota


def run_anchors(cfg: AnchorsConfig) -> dict:
    ds = Dataset(cfg.dataset)
    train = make_split(ds.read_queries(), cfg.split).train
    models = ds.model_ids()
    table = select_anchors(ds.correctness(train, models), train, k=cfg.k, seed=cfg.seed)
    path = ds.write_anchors(table, Path(cfg.output) if cfg.output else None)
    per_stratum = np.bincount(table.column(schemas.N_CORRECT).to_numpy(), minlength=len(models))
    return {
        "anchors": len(table),
        "models": len(models),
        "train_queries": len(train),
        "per_stratum": {s: int(per_stratum[s]) for s in range(1, len(models))},
        "output": str(path),
    }
