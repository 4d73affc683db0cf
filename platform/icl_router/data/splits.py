"""Named splits: which queries train the router and which judge it.

``standard`` is the protocol of docs/design.md §8: queries in dataset order;
the ID tasks' queries, by their positions in that order, are permuted with
``numpy.random.RandomState(seed)``; the first ``int(train_fraction * n)`` train,
the rest are ID test; every query of an OOD task is OOD test. ``given`` uses
the dataset's own ``split`` column (train / test / ood).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from icl_router import schemas
from icl_router.config import SplitConfig

# Task lists of the public datasets (their in- and out-of-distribution tasks).
PRESETS: dict[str, tuple[list[str], list[str]]] = {
    "llmrouter": (
        ["mmlu", "gsm8k", "math", "mbpp", "arc_challenge", "commonsense_qa", "openbook_qa", "natural_qa", "agentverse-logicgrid"],
        ["gpqa", "human_eval", "trivia_qa", "agentverse-mgsm", "commongen"],
    ),
    "zeroeval": (["gsm", "math-l5"], ["crux"]),
}


@dataclass(frozen=True)
class Split:
    """Query ids of each part, each in dataset order."""

    train: list[str]
    test: list[str]
    ood: list[str]

    def part(self, name: str) -> list[str]:
        if name not in ("train", "test", "ood"):
            raise ValueError(f"split part {name!r} does not exist; use train, test or ood")
        return getattr(self, name)


def _task_lists(cfg: SplitConfig, tasks: set[str]) -> tuple[list[str], list[str]]:
    if cfg.id_tasks is not None:
        return cfg.id_tasks, cfg.ood_tasks or []
    for id_tasks, ood_tasks in PRESETS.values():
        if tasks <= set(id_tasks) | set(ood_tasks) and tasks & set(id_tasks):
            return id_tasks, ood_tasks
    raise ValueError(
        f"split.id_tasks is not set and the tasks {sorted(tasks)} match no preset "
        f"({', '.join(PRESETS)}); set split.id_tasks (and split.ood_tasks) in the config"
    )


def make_split(queries: pa.Table, cfg: SplitConfig) -> Split:
    ids = queries.column(schemas.QUERY_ID).to_pylist()
    if cfg.name == "given":
        split = queries.column(schemas.SPLIT).to_pylist()
        parts = {p: [q for q, s in zip(ids, split) if s == p] for p in ("train", "test", "ood")}
        if not parts["train"]:
            raise ValueError("split.name=given but no query has split == 'train'; use split.name=standard")
        return Split(**parts)
    tasks = queries.column(schemas.TASK).to_pylist()
    id_tasks, ood_tasks = _task_lists(cfg, set(tasks))
    unknown = set(id_tasks) & set(ood_tasks)
    if unknown:
        raise ValueError(f"split: tasks {sorted(unknown)} are listed as both ID and OOD")
    id_set, ood_set = set(id_tasks), set(ood_tasks)
    idx = np.array([i for i, t in enumerate(tasks) if t in id_set], dtype=np.int64)
    if len(idx) == 0:
        raise ValueError(f"split: no query belongs to the ID tasks {sorted(id_set)}")
    perm = np.random.RandomState(cfg.seed).permutation(idx)
    n_train = int(cfg.train_fraction * len(perm))
    train_pos, test_pos = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    return Split(
        train=[ids[i] for i in train_pos],
        test=[ids[i] for i in test_pos],
        ood=[q for q, t in zip(ids, tasks) if t in ood_set],
    )
