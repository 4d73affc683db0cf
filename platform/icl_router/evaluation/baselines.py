"""The simple routers every ICL-Router figure is put beside (shared/data/README.md).

Each returns a score matrix [n_test, M] (higher = route there); argmax with ties
going to the first model in name order gives the routed model.
"""

from __future__ import annotations

import numpy as np


def routed_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean correctness (percent) of the argmax model; scores and labels [n, M]."""
    chosen = np.asarray(scores).argmax(axis=1)
    return float(100 * np.nanmean(labels[np.arange(len(labels)), chosen]))


def _train_acc(labels: np.ndarray) -> np.ndarray:
    return np.nanmean(labels, axis=0)  # [M]


def best_single(train_labels: np.ndarray, n_test: int) -> np.ndarray:
    return np.broadcast_to(_train_acc(train_labels), (n_test, train_labels.shape[1]))


def max_expert(train_labels: np.ndarray, train_tasks: list[str], test_tasks: list[str], *, test_labels: np.ndarray | None = None) -> np.ndarray:
    """Best model per task, picked on train; a task unseen in train is picked on ``test_labels`` (OOD)."""
    train_tasks_a, test_tasks_a = np.asarray(train_tasks), np.asarray(test_tasks)
    out = np.zeros((len(test_tasks), train_labels.shape[1]))
    for task in np.unique(test_tasks_a):
        rows = test_tasks_a == task
        src = train_labels[train_tasks_a == task]
        if len(src) == 0:
            if test_labels is None:
                raise ValueError(f"task {task!r} has no training queries; pass test_labels to pick on test")
            src = test_labels[rows]
        out[rows] = _train_acc(src)
    return out


def knn(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, *, k: int = 20) -> np.ndarray:
    """Mean correctness of the k nearest training queries by cosine similarity."""
    a = train_emb / np.linalg.norm(train_emb, axis=1, keepdims=True)
    b = test_emb / np.linalg.norm(test_emb, axis=1, keepdims=True)
    sim = b @ a.T  # [n_test, n_train]
    nn = np.argpartition(-sim, kth=min(k, sim.shape[1] - 1), axis=1)[:, :k]  # [n_test, k]
    return np.nanmean(train_labels[nn], axis=1)  # [n_test, M]


def logreg(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, *, c: float = 1.0) -> np.ndarray:
    """One logistic regression per model on the embeddings; p(correct) per model."""
    from sklearn.linear_model import LogisticRegression

    out = np.zeros((len(test_emb), train_labels.shape[1]))
    for j in range(train_labels.shape[1]):
        known = ~np.isnan(train_labels[:, j])
        y = train_labels[known, j] >= 0.5
        if y.all() or not y.any():
            out[:, j] = float(y.mean())
            continue
        clf = LogisticRegression(C=c, max_iter=2000).fit(train_emb[known], y)
        out[:, j] = clf.predict_proba(test_emb)[:, 1]
    return out


def oracle(test_labels: np.ndarray) -> np.ndarray:
    return np.nan_to_num(test_labels, nan=0.0)


def random_expected(test_labels: np.ndarray) -> float:
    return float(100 * np.nanmean(np.nanmean(test_labels, axis=1)))
