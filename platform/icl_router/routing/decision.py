"""The decision layer: from the router's p(correct) to a choice a user can trust (pure numpy).

A router's p for a query is only as good as the anchors near it. Two corrections sit
between any router's p and the policy, both fitted on held-out train queries when the
router is trained and stored in its directory (``icl_router.json``, ``decision``):

- **Evidence-aware shrinkage.** The evidence mass of a query is
  ``S(q) = sum_k exp((cos(q, a_k) - 1) / tau)`` over the K anchors: about 1 per anchor
  that says the same as the query, about 0 for anchors unlike it. Each model's p moves
  toward its prior (its accuracy on the anchors, i.e. its profile) with weight
  ``prior_weight / (S + prior_weight)``: a query unlike every anchor routes as the
  priors say. Then a Platt map shared by all models (so a model registered by its
  profile alone gets it too) calibrates the level.
- **A default guard.** The router leaves the default model (a configured one, the one the
  fit chose as the best on the held-out queries, or else the model with the best prior) only
  when the predicted gain exceeds ``min_gain``. With costs, the gain is in utility
  ``p - cost_weight * cost`` and the default is the model whose prior utility is best.
- **The query's task, when the caller names it.** Anchors of the same task say more about a
  query than its nearest anchors of any task. For a query whose task some anchor has, p first
  moves toward the outcome rate over that task's anchors (``task_kernel``):
  ``(1 - task_weight) * p + task_weight * rate``, and the query is then routed by a layer of
  its own (``DecisionParams.task``), fitted on such queries alone: the plain layer must stay
  cautious for queries unlike every anchor, which a task the anchors know is not. A query
  without a task, or with one no anchor has, gets the plain layer.

``fit_decision`` picks ``tau`` and ``prior_weight`` by log loss and ``min_gain`` by routed
accuracy, on two views of the held-out queries: as they are, and with the anchors of
their own cluster hidden (queries unlike the anchors, which in-distribution validation
never shows). Ties go to the more cautious setting; ``min_gain`` is the most cautious margin
within one standard error of the best (``pick_min_gain``).

The guard's margin depends on the pool: one fitted on a pool without its strongest model
keeps a strong newcomer from being used. When the pool is not the one the layer was
fitted on (``fitted["models"]``), the margin is refitted on the anchors, whose outcomes
every registered model has (``decision_fit.refit_guard``); a fitted default that is not in
that pool gives way to the best prior there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace

import numpy as np

from icl_router.errors import UserError

TAUS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)  # similarity temperatures of the evidence mass
TASK_WEIGHTS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)  # share of the same-task rate in a task query's p
TASK_TAUS = (0.05, 0.1, 0.15, 0.2, 0.3)  # similarity temperatures over the same-task anchors
CLIP = 0.02  # the same-task rate is clipped to [CLIP, 1 - CLIP], as the evidence head's rates are
PRIOR_WEIGHTS = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.0)  # most cautious first
MIN_GAINS = (0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.0)
EPS = 1e-6


class DecisionError(UserError):
    """Decision parameters that cannot be used; the message names the field."""


@dataclass(frozen=True)
class DecisionParams:
    """What the decision layer does with p; stored in the router directory, overridable per request."""

    tau: float = 0.1  # temperature of the evidence mass (cosine similarity units)
    prior_weight: float = 0.0  # pseudo-count of the prior against the evidence mass; 0: no shrinkage
    min_gain: float = 0.0  # predicted gain over the default needed to leave it; 1: always the default
    default_model: str | None = None  # None: the model with the best prior
    calibration: tuple[float, float] = (1.0, 0.0)  # Platt (scale, offset) on logit p, shared by all models
    # how the fit went (rows, accuracies); informative, except "models" (the pool fitted on) and "default" (``fitted_default``)
    fitted: dict = field(default_factory=dict, compare=False)
    task_weight: float = 0.0  # share of the same-task anchors' rate in p; 0: the query's task is not read
    task_tau: float = 0.15  # temperature over the same-task anchors (cosine similarity units)
    task: DecisionParams | None = None  # the layer for queries whose task has anchors; None: the plain layer routes them

    def __post_init__(self) -> None:
        check("tau", self.tau, lo=0.0, lo_open=True)
        check("prior_weight", self.prior_weight, lo=0.0)
        check("min_gain", self.min_gain, lo=0.0, hi=1.0)
        check("task_weight", self.task_weight, lo=0.0, hi=1.0)
        check("task_tau", self.task_tau, lo=0.0, lo_open=True)
        if len(self.calibration) != 2 or not all(np.isfinite(self.calibration)) or self.calibration[0] <= 0:
            raise DecisionError(f"decision.calibration must be (scale > 0, offset), got {self.calibration}")
        if self.task is not None and (not isinstance(self.task, DecisionParams) or self.task.task is not None):
            raise DecisionError("decision.task must be a decision layer without a task layer of its own")

    def replace(self, **changes: object) -> DecisionParams:
        """A copy with ``changes`` (per-request overrides, applied to the task layer too); unknown names are errors."""
        unknown = set(changes) - set(OVERRIDABLE)
        if unknown:
            raise DecisionError(f"decision: {sorted(unknown)} cannot be overridden; use {list(OVERRIDABLE)}")
        task = None if self.task is None else self.task.replace(**changes)
        return dataclass_replace(self, **changes, task=task)

    def for_task(self, has_task: bool) -> DecisionParams:
        """The layer a query is routed by: the task layer when its task has anchors and there is one."""
        return self.task if has_task and self.task is not None else self

    def row_layers(self, task_rows: np.ndarray) -> list[tuple[DecisionParams, np.ndarray]]:
        """(layer, row indices) pairs that route each of Q queries once: the plain rows by this layer,
        the task rows (bool [Q]) by ``task`` when there is one; a layer with no rows is left out."""
        task_rows = np.asarray(task_rows, dtype=bool) & (self.task is not None)
        pairs = [(self, np.flatnonzero(~task_rows)), (self.task, np.flatnonzero(task_rows))]
        return [(layer, rows) for layer, rows in pairs if len(rows)]

    def to_json(self) -> dict:
        return {**asdict(self), "calibration": list(self.calibration), "task": None if self.task is None else self.task.to_json()}

    @classmethod
    def from_json(cls, raw: dict | None) -> DecisionParams:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise DecisionError(f"decision must be an object, got {type(raw).__name__}")
        try:
            task = raw.get("task")
            return cls(**{**raw, "calibration": tuple(raw.get("calibration", (1.0, 0.0))), "task": None if task is None else cls.from_json(task)})
        except TypeError as e:
            raise DecisionError(f"decision: {e}") from None


OVERRIDABLE = ("prior_weight", "min_gain", "default_model")


def check(name: str, value: float, *, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and np.isfinite(value) and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise DecisionError(f"decision.{name} must be a number {rng}, got {value!r}")


# ---------------------------------------------------------------------------
# The pieces


def cosine(query_emb: np.ndarray, anchor_emb: np.ndarray) -> np.ndarray:
    """[Q, E], [K, E] -> cosine similarity [Q, K]."""
    q = query_emb / np.maximum(np.linalg.norm(query_emb, axis=1, keepdims=True), EPS)
    a = anchor_emb / np.maximum(np.linalg.norm(anchor_emb, axis=1, keepdims=True), EPS)
    return (q @ a.T).astype(np.float64)


def evidence_mass(sim: np.ndarray, tau: float) -> np.ndarray:
    """Cosine similarities [Q, K] (NaN: an anchor hidden from that query) -> mass S [Q]."""
    return np.nansum(np.exp((sim - 1.0) / tau), axis=1)


def shrink(p: np.ndarray, mass: np.ndarray, prior: np.ndarray, prior_weight: float) -> np.ndarray:
    """p [Q, T] toward prior [T] by prior_weight / (S + prior_weight); mass S [Q], or [Q, T] when each
    model has its own (the evidence store's outcomes, routing/evidence_store.py)."""
    if prior_weight == 0:
        return p
    mass = np.asarray(mass, dtype=np.float64)
    w = mass / (mass + prior_weight)  # the evidence's share
    w = w[:, None] if w.ndim == 1 else w  # [Q, 1] or [Q, T]
    return w * p + (1 - w) * prior[None]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def calibrate(p: np.ndarray, calibration: tuple[float, float]) -> np.ndarray:
    a, b = calibration
    if (a, b) == (1.0, 0.0):
        return p
    return 1 / (1 + np.exp(-(a * logit(p) + b)))


def task_kernel(sim: np.ndarray, profiles: np.ndarray, *, query_tasks: np.ndarray, anchor_tasks: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(rate [Q, T], has [Q]): each model's outcome rate over the anchors of the query's own task,
    softmax(cos / tau)-weighted, for cosine sim [Q, K] (NaN: hidden), profiles bool [T, K] and the
    tasks of the queries [Q] (None: not named) and of the anchors [K]; ``has``: some visible anchor
    has the query's task (the other rows' rate is meaningless)."""
    same = (np.asarray(query_tasks, dtype=object)[:, None] == np.asarray(anchor_tasks, dtype=object)[None, :]) & ~np.isnan(sim)  # [Q, K]
    has = same.any(axis=1)
    s = np.where(same, sim, -np.inf)
    s = s - np.where(has, s.max(axis=1), 0.0)[:, None]  # the nearest same-task anchor at 0: exp cannot overflow
    w = np.exp(s / tau)  # [Q, K]
    w /= np.maximum(w.sum(axis=1, keepdims=True), EPS)
    return np.clip(w @ np.asarray(profiles, dtype=np.float64).T, CLIP, 1 - CLIP), has  # [Q, T], [Q]


@dataclass(frozen=True)
class LayerInput:
    """What the decision layer routes each query on: p [Q, T] (moved toward the same-task rate on
    task rows), the evidence mass [Q] at the temperature of the query's layer, which rows are task rows [Q]."""

    p: np.ndarray
    mass: np.ndarray
    task_rows: np.ndarray


def layer_input(
    p: np.ndarray, sim: np.ndarray, *, params: DecisionParams, profiles: np.ndarray, query_tasks: object = None, anchor_tasks: object = None
) -> LayerInput:
    """The decision layer's input for the router's p [Q, T] and the queries' cosine to the anchors [Q, K]:
    queries whose named task (``query_tasks`` [Q], None each where not named) some anchor has
    (``anchor_tasks`` [K]) go to ``params.task``; the rest keep p and the plain layer."""
    p = np.asarray(p, dtype=np.float64)
    mass = evidence_mass(sim, params.tau)  # [Q]
    task = params.task
    if task is None or query_tasks is None or anchor_tasks is None:
        return LayerInput(p, mass, np.zeros(len(p), dtype=bool))
    rate, has = task_kernel(sim, profiles, query_tasks=query_tasks, anchor_tasks=anchor_tasks, tau=task.task_tau)
    mixed = (1 - task.task_weight) * p + task.task_weight * rate
    return LayerInput(np.where(has[:, None], mixed, p), np.where(has, evidence_mass(sim, task.tau), mass), has)


def adjusted(p: np.ndarray, mass: np.ndarray, prior: np.ndarray, params: DecisionParams) -> np.ndarray:
    """The decision layer's p [Q, T]: shrunk toward the priors, then calibrated."""
    return calibrate(shrink(np.asarray(p, dtype=np.float64), mass, prior, params.prior_weight), params.calibration)


def default_index(models: list[str], prior: np.ndarray, params: DecisionParams, *, cost_weight: float = 0.0, costs: np.ndarray | None = None) -> int:
    """The default model's column: the configured one (it must be in ``models``); the one the fit chose on
    held-out queries (``fitted_default``) when it is in ``models`` and no cost is weighed; else the best prior utility."""
    fitted = fitted_default(params)
    if params.default_model is not None and not fitted:
        if params.default_model not in models:
            raise DecisionError(f"decision.default_model {params.default_model!r} is not in the pool {models}; register it or unset it")
        return models.index(params.default_model)
    if fitted and params.default_model in models and not cost_weight:
        return models.index(params.default_model)
    u = prior - cost_weight * (costs if costs is not None else 0.0)
    return int(np.argmax(u))  # first best wins ties


def fitted_default(params: DecisionParams) -> bool:
    """True when ``default_model`` is the one ``fit_decision`` chose on held-out queries (``fitted["default"]``),
    not one a user configured: a pool without it, or a cost weighed, falls back to the best prior utility."""
    return params.default_model is not None and params.fitted.get("default") == params.default_model


def held_out_default(labels: np.ndarray) -> int:
    """The column of the best mean accuracy over held-out queries' labels [V, T] (NaN: unknown; first best wins ties)."""
    labels = np.asarray(labels, dtype=np.float64)
    known = (~np.isnan(labels)).sum(axis=0)
    acc = np.where(known > 0, np.nansum(labels, axis=0) / np.maximum(known, 1), -np.inf)
    return int(np.argmax(acc))


def with_default(params: DecisionParams, model: str | None) -> DecisionParams:
    """``params`` (and its task layer) with ``model`` as the fitted default; None: no fitted default (the best prior)."""
    fitted = {k: v for k, v in params.fitted.items() if k != "default"} | ({} if model is None else {"default": model})
    task = None if params.task is None else with_default(params.task, model)
    return dataclass_replace(params, default_model=model, fitted=fitted, task=task)


def guarded_choice(p: np.ndarray, default: int, min_gain: float, *, cost_weight: float = 0.0, costs: np.ndarray | None = None) -> np.ndarray:
    """Chosen column [Q]: the best utility ``p - cost_weight * cost`` unless it beats the default's by <= min_gain."""
    u = p - cost_weight * (np.broadcast_to(costs, p.shape) if costs is not None else 0.0)  # [Q, T]
    best = u.argmax(axis=1)
    rows = np.arange(len(u))
    gain = u[rows, best] - u[rows, default]
    return np.where(gain > min_gain, best, default)


def routed_accuracy(choice: np.ndarray, labels: np.ndarray) -> float:
    """Mean correctness (percent) of the chosen column; labels [Q, T] with NaN where unknown."""
    return float(100 * np.nanmean(labels[np.arange(len(labels)), choice]))


def pick_min_gain(hits: dict[float, np.ndarray]) -> float:
    """The guard's margin from ``hits``: {min_gain: per-query correctness [Q] of routing with it} on the
    same queries (NaN: unknown). The most cautious (largest) margin whose routed accuracy is within one
    standard error of the best's (the paired one, of the per-query difference): a margin that wins on a
    handful of queries is not evidence enough to leave the default more often."""
    mean = {g: float(np.nanmean(h)) for g, h in hits.items()}
    best = max(hits, key=lambda g: (round(mean[g], 9), g))  # the best, then the more cautious
    for g in sorted(hits, reverse=True):
        if g <= best:
            return best
        d = hits[best] - hits[g]
        d = d[~np.isnan(d)]
        if len(d) < 2 or d.mean() <= d.std(ddof=1) / np.sqrt(len(d)):
            return g
    return best


# ---------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class View:
    """Held-out queries as the router sees them: p [V, T], cosine to the anchors [V, K] (NaN: hidden)."""

    p: np.ndarray
    sim: np.ndarray


def fit_decision(
    views: list[View],
    labels: np.ndarray,
    prior: np.ndarray,
    *,
    taus: tuple[float, ...] = TAUS,
    prior_weights: tuple[float, ...] = PRIOR_WEIGHTS,
    min_gains: tuple[float, ...] = MIN_GAINS,
    default: int | None = None,
) -> DecisionParams:
    """Fit on ``views`` of the same held-out queries (labels [V, T], NaN where unknown); the guard's
    margin is picked for the ``default`` column (None: the best prior, as routing picks it without one).

    The shrinkage (tau, prior_weight) is an estimate of p, so it is picked by log loss, a proper
    scoring rule: the cost policies trade p itself against money, and an accuracy objective
    would flatten p to the priors wherever one model wins most queries. A Platt map is then
    fitted on the first view, and the guard's min_gain is picked by routed accuracy. Means run
    over the views; the grids run from cautious to bold and ties keep the more cautious value.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if not views or len(labels) == 0:
        raise DecisionError("fit_decision needs held-out queries with labels; got none")
    known = ~np.isnan(labels)
    y = labels[known] >= 0.5
    best, best_loss = None, np.inf
    for tau in taus:
        masses = [evidence_mass(v.sim, tau) for v in views]
        for m in prior_weights:
            loss = float(np.mean([log_loss(shrink(v.p, s, prior, m)[known], y) for v, s in zip(views, masses)]))
            if loss < best_loss - 1e-12:
                best, best_loss = (tau, m), loss
    tau, m = best
    shrunk = [shrink(v.p, evidence_mass(v.sim, tau), prior, m) for v in views]
    cal = fit_platt(shrunk[0], labels)
    final = [calibrate(q, cal) for q in shrunk]
    default = int(np.argmax(prior)) if default is None else default
    rows = np.arange(len(labels))
    hits = {g: np.mean([labels[rows, guarded_choice(q, default, g)] for q in final], axis=0) for g in min_gains}  # [V], over the views
    g = pick_min_gain(hits)
    acc = 100 * float(np.nanmean(hits[g]))
    fitted = {"rows": int(len(labels)), "views": len(views), "log_loss": round(best_loss, 5), "accuracy": round(acc, 3)}
    return DecisionParams(tau=tau, prior_weight=m, min_gain=g, calibration=cal, fitted=fitted)


def fit_task_layer(
    views: list[View],
    labels: np.ndarray,
    prior: np.ndarray,
    *,
    profiles: np.ndarray,
    query_tasks: object,
    anchor_tasks: object,
    task_weights: tuple[float, ...] = TASK_WEIGHTS,
    task_taus: tuple[float, ...] = TASK_TAUS,
    default: int | None = None,
) -> DecisionParams | None:
    """The layer for queries whose task has anchors, fitted on such held-out queries (None if there are none).

    ``task_weight`` and ``task_tau`` are picked by log loss, as the shrinkage is (the mix is an
    estimate of p); then ``fit_decision`` fits the rest on the mixed p. In the second view (own
    cluster hidden) a query whose task's anchors are all hidden keeps its unmixed p.
    """
    labels = np.asarray(labels, dtype=np.float64)
    rates = {t: [task_kernel(v.sim, profiles, query_tasks=query_tasks, anchor_tasks=anchor_tasks, tau=t) for v in views] for t in task_taus}
    rows = rates[task_taus[0]][0][1]  # [V] the held-out queries whose task has anchors
    if not rows.any():
        return None
    known = ~np.isnan(labels[rows])
    y = labels[rows][known] >= 0.5

    def mixed(weight: float, tau: float) -> list[View]:
        return [View(np.where(has[:, None], (1 - weight) * v.p + weight * rate, v.p)[rows], v.sim[rows]) for v, (rate, has) in zip(views, rates[tau])]

    loss = {(w, t): float(np.mean([log_loss(v.p[known], y) for v in mixed(w, t)])) for t in task_taus for w in task_weights}
    w, t = min(loss, key=lambda k: (round(loss[k], 9), k))  # ties: the smaller weight, then the sharper kernel
    layer = fit_decision(mixed(w, t), labels[rows], prior, default=default)
    return dataclass_replace(layer, task_weight=w, task_tau=t, fitted={**layer.fitted, "task_log_loss": round(loss[(w, t)], 5)})


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def fit_platt(p: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """One (scale, offset) on logit p for every model, by logistic regression on the known labels."""
    from sklearn.linear_model import LogisticRegression

    known = ~np.isnan(labels)
    y = labels[known] >= 0.5
    if y.all() or not y.any():
        return (1.0, 0.0)
    clf = LogisticRegression(C=100.0).fit(logit(p[known])[:, None], y)
    a, b = float(clf.coef_[0, 0]), float(clf.intercept_[0])
    return (a, b) if a > 0 else (1.0, 0.0)  # a reversed map would turn the ranking over: keep p as it is


def cluster_groups(emb: np.ndarray, *, n_clusters: int = 8, seed: int = 0) -> np.ndarray:
    """k-means cluster ids [N] of embeddings [N, E] (the units hidden from each other in ``fit_decision``'s second view)."""
    from sklearn.cluster import KMeans

    n = min(n_clusters, len(emb))
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), EPS)
    return KMeans(n_clusters=n, n_init=3, random_state=seed).fit_predict(unit)


def hide_own_cluster(sim: np.ndarray, query_groups: np.ndarray, anchor_groups: np.ndarray) -> np.ndarray:
    """sim [V, K] with each query's own-cluster anchors set to NaN (hidden)."""
    return np.where(query_groups[:, None] == anchor_groups[None, :], np.nan, sim)
