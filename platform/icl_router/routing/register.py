"""Adding models to a trained router without retraining (docs/design.md §2).

A model's profile is its right/wrong record on the router's K anchors (the
``anchor_query_ids`` of ``icl_router.json``, in order), read from a dataset's
outcomes. Registering writes it into the directory's ``profiles.parquet``
(atomic rewrite; re-registering replaces that model's profile). Every model is
checked before anything is written, so a refusal leaves the directory as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_router import schemas
from icl_router.data.dataset import Dataset, DatasetError, correctness_matrix
from icl_router.model.router_dir import PROFILES_FILE, read_meta, read_profiles, write_profiles


def anchor_profiles(dataset: Dataset, model_ids: Sequence[str], anchor_ids: list[str]) -> dict[str, np.ndarray]:
    """bool [K] per model: correct on the majority of its samples of each anchor (as training does)."""
    outcomes = dataset.read_outcomes(model_ids)
    known = set(outcomes.column(schemas.MODEL_ID).to_pylist())
    unknown = [m for m in model_ids if m not in known]
    if unknown:
        raise DatasetError(
            f"models {unknown} have no outcomes in {dataset.root}; the dataset has models {dataset.model_ids()} "
            "(profile a new model on the anchors first with `icl-router profile`)"
        )
    acc = correctness_matrix(outcomes, anchor_ids, list(model_ids))  # [K, M], NaN where no outcome
    problems = []
    for j, m in enumerate(model_ids):
        missing = [anchor_ids[i] for i in np.flatnonzero(np.isnan(acc[:, j]))]
        if missing:
            problems.append(f"model {m!r} lacks outcomes on {len(missing)} of the router's {len(anchor_ids)} anchors: {missing}")
    if problems:
        raise DatasetError(
            "; ".join(problems) + f". Nothing was registered: profile the model(s) on these anchor queries of {dataset.root} first"
        )
    return {m: acc[:, j] >= 0.5 for j, m in enumerate(model_ids)}


def register_models(router_dir: str | Path, dataset_dir: str | Path, model_ids: Sequence[str]) -> dict[str, Any]:
    """Add (or replace) the profiles of ``model_ids`` in the router directory's pool; no training."""
    router_dir = Path(router_dir)
    if not model_ids or len(set(model_ids)) != len(model_ids):
        raise DatasetError(f"register: give each model once, got {list(model_ids)}")
    anchor_ids = read_meta(router_dir).anchor_query_ids
    pool = read_profiles(router_dir / PROFILES_FILE, anchor_ids)
    new = anchor_profiles(Dataset(dataset_dir), model_ids, anchor_ids)
    registered = [{"model_id": m, "profile_accuracy": round(float(p.mean()), 4), "replaced": m in pool} for m, p in new.items()]
    pool.update(new)  # a replaced model keeps its place in the pool order
    write_profiles(router_dir / PROFILES_FILE, pool, anchor_ids)
    return {"router": str(router_dir), "n_anchors": len(anchor_ids), "registered": registered, "pool": list(pool)}


def register_model(router_dir: str | Path, dataset_dir: str | Path, model_id: str) -> dict[str, Any]:
    """One model: ``{"model_id", "profile_accuracy", "replaced"}``."""
    return register_models(router_dir, dataset_dir, [model_id])["registered"][0]
