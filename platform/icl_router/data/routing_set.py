"""The dense view every router job works on: embeddings, labels, anchors, profiles.

Built once from a dataset directory (queries, outcomes, embeddings, anchors) and
a named split; pure numpy, so training, evaluation and registration share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icl_router import schemas
from icl_router.config import SplitConfig
from icl_router.data.dataset import Dataset, DatasetError
from icl_router.data.splits import Split, make_split


@dataclass
class RoutingSet:
    models: list[str]  # M, in name order
    query_ids: list[str]  # N, every query of the dataset in dataset order
    texts: list[str]  # N
    tasks: list[str]  # N
    embeddings: np.ndarray  # [N, d] float32
    labels: np.ndarray  # [N, M] float32: mean correct, NaN where no outcome
    anchor_ids: list[str]  # K, in anchor position order
    split: Split
    embedder: str

    @property
    def index(self) -> dict[str, int]:
        return {q: i for i, q in enumerate(self.query_ids)}

    def rows(self, part: str) -> np.ndarray:
        """Row indices [n] of a split part (train / test / ood)."""
        index = self.index
        return np.array([index[q] for q in self.split.part(part)], dtype=np.int64)

    @property
    def anchor_rows(self) -> np.ndarray:
        index = self.index
        return np.array([index[q] for q in self.anchor_ids], dtype=np.int64)

    def profiles(self, models: list[str] | None = None) -> np.ndarray:
        """[M, K] bool: each model's right/wrong record on the anchors, in anchor order."""
        cols = [self.models.index(m) for m in models] if models else slice(None)
        lab = self.labels[self.anchor_rows][:, cols]  # [K, M]
        if np.isnan(lab).any():
            bad = [self.models[j] if models is None else models[j] for j in np.where(np.isnan(lab).any(0))[0]]
            raise DatasetError(f"models {bad} have no outcome on some anchors; profile them on the anchors first")
        return (lab.T >= 0.5)

    def training_pairs(self, *, exclude_anchors: bool = True) -> np.ndarray:
        """[P, 3] int64 (row, model, label) of the train part with a known label."""
        rows = self.rows("train")
        if exclude_anchors:
            rows = rows[~np.isin(rows, self.anchor_rows)]
        lab = self.labels[rows]  # [n, M]
        r, m = np.nonzero(~np.isnan(lab))
        return np.stack([rows[r], m, (lab[r, m] >= 0.5).astype(np.int64)], axis=1)


def load_routing_set(dataset: str | Dataset, *, split: SplitConfig, embedder: str, models: list[str] | None = None) -> RoutingSet:
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    q = ds.read_queries()
    query_ids = q.column(schemas.QUERY_ID).to_pylist()
    models = models or ds.model_ids()
    if not models:
        raise DatasetError(f"{ds.root} has no outcomes; import or profile a pool first")
    anchors = ds.read_anchors().column(schemas.QUERY_ID).to_pylist() if ds.anchors_path.exists() else []
    return RoutingSet(
        models=models,
        query_ids=query_ids,
        texts=q.column(schemas.TEXT).to_pylist(),
        tasks=q.column(schemas.TASK).to_pylist(),
        embeddings=ds.embedding_matrix(query_ids, embedder=embedder),
        labels=ds.correctness(query_ids, models),
        anchor_ids=anchors,
        split=make_split(q, split),
        embedder=embedder,
    )
