"""What a training run reads: ``TrainData``, built from a routing set by ``build_train_data``.

The one hand-off between the data and the training loop, for the Ray Train job
(``train.driver``, shipped to the workers with ``ray.put``) and for in-process
training in evaluation (``evaluation.fit``). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icl_router.data.dataset import DatasetError
from icl_router.data.routing_set import RoutingSet


@dataclass
class TrainData:
    """N queries of the routing set, M pool models, K anchors, E embedding width, P items."""

    # int64 [P, 3] (row, model, label): stage 2 trains on each (query row, model index, 1 if correct);
    # stage 1 reads only the row column (its model and label columns are -1)
    items: np.ndarray
    texts: list[str]  # N, indexed by row
    embeddings: np.ndarray  # float32 [N, E], indexed by row
    anchor_emb: np.ndarray  # float32 [K, E]: the anchors' embeddings, in anchor order
    profiles: np.ndarray  # bool [M, K]: each model's outcomes on the anchors
    models: list[str]  # M model ids; the model column of items indexes them

    @property
    def rows(self) -> np.ndarray:
        """int64 [P]: the query row of each item."""
        return self.items[:, 0]


def build_train_data(rs: RoutingSet, *, stage: int, val_fraction: float = 0.0, seed: int = 0, models: list[int] | None = None) -> tuple[TrainData, np.ndarray]:
    """(the training data, validation rows [V]) of a routing set with anchors.

    Stage 2 trains on the train part's (query, model) pairs with a known label, anchors
    excluded; stage 1 on the train part's queries and the anchors. ``val_fraction`` of
    the stage-2 train queries (drawn with ``seed``) is held out of the items and returned
    as validation rows, for picking the step. ``models`` keeps only those pool columns
    (indices into ``rs.models``), renumbered in the given order.
    """
    if not rs.anchor_ids:
        raise DatasetError("the routing set has no anchors; run `icl-router anchors` on the dataset first")
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    keep = list(range(len(rs.models))) if models is None else list(models)
    profiles = rs.profiles()[keep]  # [M, K]
    val = np.zeros(0, dtype=np.int64)
    if stage == 1:
        rows = np.union1d(rs.rows("train"), rs.anchor_rows)
        items = np.stack([rows, np.full_like(rows, -1), np.full_like(rows, -1)], axis=1)
    else:
        items = rs.training_pairs()  # [P, 3] (row, model, label)
        if val_fraction > 0:
            rows = np.unique(items[:, 0])
            val = np.sort(np.random.default_rng(seed + 7).choice(rows, size=int(val_fraction * len(rows)), replace=False))
            items = items[~np.isin(items[:, 0], val)]
        if models is not None:
            remap = np.full(len(rs.models), -1, dtype=np.int64)
            remap[keep] = np.arange(len(keep))
            items = items[remap[items[:, 1]] >= 0]
            items[:, 1] = remap[items[:, 1]]
    if len(items) == 0:
        raise DatasetError(f"stage {stage}: the split's train part has no usable rows (train queries with a known outcome, anchors aside); check the split's tasks")
    data = TrainData(
        items=items.astype(np.int64),
        texts=rs.texts,
        embeddings=rs.embeddings,
        anchor_emb=rs.embeddings[rs.anchor_rows],
        profiles=profiles,
        models=[rs.models[m] for m in keep],
    )
    return data, val
