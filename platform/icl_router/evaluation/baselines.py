"""The simple routers every ICL-Router figure is put beside (docs/design.md §8).

Each returns a score matrix [n_test, M] (higher = route there); argmax with ties
going to the first model in name order gives the routed model.
"""

from __future__ import annotations

import warnings

import numpy as np

from icl_router.routing.decision import routed_accuracy


def routed_hits(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Correctness [n] (NaN where unlabelled) of the argmax model; scores and labels [n, M]."""
    chosen = np.asarray(scores).argmax(axis=1)
    return np.asarray(labels, dtype=np.float64)[np.arange(len(labels)), chosen]


def earliest_within_se(hits: list[np.ndarray]) -> int:
    """The index of the first candidate whose routed accuracy is within one standard error of the best's.

    ``hits`` are the candidates' per-query correctness [n] on the same held-out queries (``routed_hits``),
    simplest first (the untrained router, then later steps). The standard error is the paired one,
    of the per-query difference to the best: a few hundred held-out queries cannot tell routers apart
    that differ on a handful of them, and a later candidate that wins by less keeps the simpler one
    (the one-standard-error rule).
    """
    best = int(np.argmax([np.nanmean(h) for h in hits]))
    for i, h in enumerate(hits[:best]):
        d = hits[best] - h  # [n]
        d = d[~np.isnan(d)]
        if len(d) < 2 or d.mean() <= d.std(ddof=1) / np.sqrt(len(d)):
            return i
    return best


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


KNN_TUNED_KS = (10, 20, 50, 100, 200)
KNN_TUNED_MS = (0, 2, 5, 10, 20, 50, 100)
KNN_TUNED_DELTAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def knn_tuned(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    test_emb: np.ndarray,
    *,
    tasks: tuple[list[str], list[str]] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """The tuned neighbour rule, the bar a router must clear: (scores [n_test, M], picked params).

    p = (sum of the k nearest train queries' outcomes + m * the model's train accuracy) / (k + m);
    the pool's best model by train accuracy unless another's p beats it by more than delta.
    k, m and delta are picked on a ``val_fraction`` slice of train (neighbours from the rest),
    then applied with all of train. The scores are one-hot on the chosen model. With ``tasks``
    (train tasks, test tasks) the accuracy is the model's on the query's own task where train has
    it (``task_prior``): the rule reads the task, as the router does when queries name it.
    """
    train_tasks, test_tasks = tasks if tasks is not None else (None, None)
    params = knn_tuned_fit(train_emb, train_labels, train_tasks=train_tasks, val_fraction=val_fraction, seed=seed)
    prior = task_prior(train_labels, train_tasks, test_tasks) if tasks is not None else _train_acc(train_labels)
    p = knn_tuned_p(train_emb, train_labels, test_emb, params, prior=prior)
    return _guard(p, prior, params["delta"]), params


def task_prior(train_labels: np.ndarray, train_tasks: list[str], tasks: list[str]) -> np.ndarray:
    """[n, M]: each model's train accuracy on the task of each of ``tasks`` (all of train for a task train has not)."""
    train_tasks_a, tasks_a = np.asarray(train_tasks), np.asarray(tasks)
    out = np.broadcast_to(_train_acc(train_labels), (len(tasks_a), train_labels.shape[1])).copy()
    for task in np.unique(tasks_a):
        src = train_labels[train_tasks_a == task]
        if len(src):
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a model with no known outcome on the task
                acc = _train_acc(src)
            out[tasks_a == task] = np.where(np.isnan(acc), out[tasks_a == task][0], acc)
    return out


def knn_tuned_fit(train_emb: np.ndarray, train_labels: np.ndarray, *, train_tasks: list[str] | None = None, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """{k, m, delta, val_acc}: the grid point with the best routed accuracy on the validation slice."""
    rng = np.random.default_rng(seed + 11)
    n = len(train_emb)
    val = np.zeros(n, dtype=bool)
    val[rng.choice(n, size=max(1, int(val_fraction * n)), replace=False)] = True
    best, best_acc = None, -1.0
    if train_tasks is None:
        prior_fit = _train_acc(train_labels[~val])  # [M]
    else:
        t = np.asarray(train_tasks)
        prior_fit = task_prior(train_labels[~val], t[~val], t[val])  # [n_val, M]
    for k in KNN_TUNED_KS:
        s, c = _knn_counts(train_emb[~val], train_labels[~val], train_emb[val], k=k)
        for m in KNN_TUNED_MS:
            p = (s + m * prior_fit) / np.maximum(c + m, 1e-9)
            for d in KNN_TUNED_DELTAS:
                acc = routed_accuracy(_guard(p, prior_fit, d).argmax(axis=1), train_labels[val])
                if acc > best_acc + 1e-9:
                    best, best_acc = (k, m, d), acc
    k, m, d = best
    return {"k": k, "m": m, "delta": d, "val_acc": round(best_acc, 2)}


def knn_tuned_p(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, params: dict, *, prior: np.ndarray | None = None) -> np.ndarray:
    """The rule's p [n_test, M]: the k neighbours' outcomes shrunk by m toward ``prior`` ([M] or [n_test, M];
    default: the train accuracy)."""
    s, c = _knn_counts(train_emb, train_labels, test_emb, k=params["k"])
    prior = _train_acc(train_labels) if prior is None else prior
    return (s + params["m"] * prior) / np.maximum(c + params["m"], 1e-9)


def _knn_counts(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of known outcomes, number known) over the k nearest train queries: [n_test, M] each."""
    a = train_emb / np.linalg.norm(train_emb, axis=1, keepdims=True)
    b = test_emb / np.linalg.norm(test_emb, axis=1, keepdims=True)
    sim = b @ a.T  # [n_test, n_train]
    k = min(k, sim.shape[1])
    nn = np.argpartition(-sim, kth=k - 1, axis=1)[:, :k]  # [n_test, k]
    lab = train_labels[nn]  # [n_test, k, M]
    return np.nansum(lab, axis=1), np.sum(~np.isnan(lab), axis=1)


def _guard(p: np.ndarray, prior: np.ndarray, delta: float) -> np.ndarray:
    """One-hot [n, M]: the argmax of p unless it beats the best-prior model by <= delta (prior [M] or [n, M])."""
    d = np.argmax(np.broadcast_to(prior, p.shape), axis=1)  # [n]
    best = p.argmax(axis=1)
    rows = np.arange(len(p))
    choice = np.where(p[rows, best] - p[rows, d] > delta, best, d)
    out = np.zeros_like(p, dtype=np.float64)
    out[rows, choice] = 1.0
    return out
