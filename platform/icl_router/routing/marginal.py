"""Marginal routed gain: what a model adds to a pool, from profiles alone (pure numpy).

The router's p(correct) for a model depends only on that model's profile and the query,
never on the rest of the pool, so p is computed once for every model (pool and
candidates) on the evaluation queries and any pool is a set of its columns. The model
the service would pick for a query is found exactly as the service finds it
(``routing.policy.route_batch``: the router directory's decision layer, then the policy).
When the pool is not the one the layer was fitted on, the service routes with the guard's
margin refitted for that pool on the anchors (``decision_fit.refit_guard``); with
``Inputs.decision_for`` every pool (base, base + candidate, base - model) is chosen with the
layer the service would use for it.
A pool's routed accuracy is estimated as the mean, over the queries, of a *score* of the
picked model; a candidate's gain is that estimate for pool + candidate minus the pool's.

How the picked model is scored is the estimator:

- ``naive``: the decision layer's own p. It suffers a winner's curse: the pick goes where
  p is highest, and a noisy p is high by chance more often than a steady one, so adding
  any model with noisy p looks like a gain.
- ``eb`` (the default): p's uncertainty propagated by empirical Bayes. Each p is read as
  a kernel average of the model's outcomes on the anchors near the query, the way the
  anchor evidence computes it (softmax of cosine / ``kernel_tau`` over the K anchors),
  so its noise variance is about ``noise_scale * p (1 - p) / n_eff(q)``, ``n_eff = 1 /
  sum_k w_k^2`` the effective number of anchors behind it (``noise_scale`` 1, the default,
  is the variance of a weighted average of Bernoulli outcomes itself). Each model's p is shrunk
  toward its mean over the queries by ``v / (v + noise)``, ``v`` the between-query
  variance of that model's p less the mean noise (method of moments); the decision
  layer's shrinkage and calibration are applied after. The pick is still made on the
  router's p: only its score is shrunk. For the anchor-evidence part of the router's p
  this noise model is exact; for the router LM's part it is an approximation (the LM
  reads the same profile, and its errors are taken to scale the same way).
- ``eb-pair``: the same on the difference between the picked model and the model the
  pool would pick without the change, with the two models' joint outcomes on the
  anchors (correlated models have a less noisy difference).
- ``eb-mix``: the mean of the ``eb`` and ``eb-pair`` gains.
- ``crossfit``: pick with p computed on all anchors but one fold, score with p from that
  fold, averaged over folds and repeats. Needs the router's p on anchor subsets: with
  the anchor-evidence head, its part of the logit is recomputed on the subset
  (``evidence_logit``) while the LM's part is held at its whole-profile value.

Gains are in accuracy points (percent of queries); traffic shares are fractions of the
queries; cost changes are dollars per query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from icl_router.errors import UserError
from icl_router.routing.decision import EPS, DecisionParams, adjusted, evidence_mass, logit
from icl_router.routing.policy import Policy, route_batch

ESTIMATORS = ("eb", "naive", "eb-pair", "eb-mix", "crossfit")
KERNEL_TAU = 0.1  # the anchor evidence's initial temperature (model/evidence.py TAUS[1])
EVIDENCE_CLIP = 0.02  # model/evidence.py CLIP


class ValuationError(UserError):
    """Inputs the estimator cannot use; the message names the field."""


# ---------------------------------------------------------------------------
# What p rests on


def kernel_weights(sim: np.ndarray, tau: float, *, keep: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the anchors of cosine / tau: [Q, K] -> [Q, K] (rows sum to 1); ``keep`` bool [K] masks anchors out."""
    z = sim / tau
    if keep is not None:
        z = np.where(keep[None], z, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def evidence_logit(sim: np.ndarray, profiles: np.ndarray, weight: np.ndarray, bias: float, taus: Sequence[float], *, keep: np.ndarray | None = None) -> np.ndarray:
    """The anchor-evidence head's logit (model/evidence.py) in numpy, on the anchors ``keep`` [K]
    only: sim [Q, K], profiles bool [T, K], weight [len(taus) + 1] -> [Q, T]."""
    y = profiles.astype(np.float64)  # [T, K]
    feats = [kernel_weights(sim, t, keep=keep) @ y.T for t in taus]  # [Q, T] each
    kept = y if keep is None else y[:, keep]
    feats.append(np.broadcast_to(kept.mean(axis=1), feats[0].shape))
    f = logit(np.clip(np.stack(feats), EVIDENCE_CLIP, 1 - EVIDENCE_CLIP))  # [F, Q, T]
    return np.einsum("f,fqt->qt", np.asarray(weight, dtype=np.float64), f) + bias


@dataclass
class Inputs:
    """Everything the estimators read, for T models (pool and candidates) and Q evaluation queries."""

    models: list[str]  # T
    p: np.ndarray  # [Q, T] the router's p(correct)
    profiles: np.ndarray  # bool [T, K] outcomes on the anchors
    sim: np.ndarray  # [Q, K] cosine of each query to each anchor
    params: DecisionParams | None = None  # the router directory's decision layer (None: the policy reads p as is)
    policy: Policy = field(default_factory=Policy)
    costs: np.ndarray | None = None  # [T] dollars per query (None: unknown)
    # crossfit: the router's p with the profile restricted to anchors ``keep`` bool [K] -> [Q, T]
    p_on_anchors: Callable[[np.ndarray], np.ndarray] | None = None
    # the decision layer the service routes a pool (its model columns) with: ``params`` with the
    # guard refitted for that pool (``decision_fit.PoolDecisions``); None: ``params`` for every pool
    decision_for: Callable[[Sequence[int]], DecisionParams] | None = None

    def __post_init__(self) -> None:
        self.p = np.asarray(self.p, dtype=np.float64)
        self.profiles = np.asarray(self.profiles, dtype=bool)
        Q, T = self.p.shape
        if self.profiles.shape[0] != T or self.sim.shape != (Q, self.profiles.shape[1]) or len(self.models) != T:
            raise ValuationError(f"inputs disagree: p {self.p.shape}, profiles {self.profiles.shape}, sim {self.sim.shape}, {len(self.models)} models")
        if self.costs is not None:
            self.costs = np.asarray(self.costs, dtype=np.float64)

    @property
    def prior(self) -> np.ndarray:
        return self.profiles.mean(axis=1)


@dataclass
class Reading:
    """One reading of p for choosing: p [Q, T], its evidence mass [Q] and the models' priors [T]."""

    p: np.ndarray
    mass: np.ndarray
    prior: np.ndarray


# ---------------------------------------------------------------------------
# The estimator


class Valuer:
    """Estimated routed accuracy of any pool (a list of model columns), and gains between pools."""

    def __init__(self, inputs: Inputs, *, estimator: str = "eb", noise_scale: float = 1.0, kernel_tau: float = KERNEL_TAU, folds: int = 2, repeats: int = 4, seed: int = 0) -> None:
        if estimator not in ESTIMATORS:
            raise ValuationError(f"estimator {estimator!r} is unknown; use one of {list(ESTIMATORS)}")
        if inputs.policy.needs_costs and inputs.costs is None:
            raise ValuationError(f"policy {inputs.policy.kind!r} needs a cost per model: set costs.<model> in the config")
        self.x, self.estimator = inputs, estimator
        self.n = inputs.p.shape[0]
        tau = inputs.params.tau if inputs.params is not None else KERNEL_TAU
        self.full = Reading(inputs.p, evidence_mass(inputs.sim, tau), inputs.prior)
        self._choices: dict[tuple, np.ndarray] = {}
        w = kernel_weights(inputs.sim, kernel_tau)  # [Q, K]
        n_eff = 1.0 / np.sum(w**2, axis=1)  # [Q]
        if estimator == "naive":
            self.score = self._adjust(self.full, inputs.p)
        elif estimator in ("eb", "eb-pair", "eb-mix"):
            p = inputs.p
            noise = noise_scale * p * (1 - p) / n_eff[:, None]  # [Q, T]
            mu = p.mean(axis=0)
            v = np.maximum(p.var(axis=0) - noise.mean(axis=0), EPS)  # [T] between-query variance of the signal
            self.score = self._adjust(self.full, (v * p + noise * mu) / (v + noise))
            if estimator != "eb":
                self.pair = self._pair_scores(w, n_eff, noise_scale)
        else:
            if inputs.p_on_anchors is None:
                raise ValuationError("estimator 'crossfit' needs the router's p on anchor subsets (a router with anchor evidence); use estimator: eb")
            self.splits = self._crossfit_views(folds, repeats, seed, tau)

    # -- the pieces ---------------------------------------------------------------

    def _adjust(self, view: Reading, p: np.ndarray) -> np.ndarray:
        """p [Q, T] as the decision layer turns it (shrunk toward the view's priors, calibrated)."""
        return p if self.x.params is None else adjusted(p, view.mass, view.prior, self.x.params)

    def _pair_scores(self, w: np.ndarray, n_eff: np.ndarray, noise_scale: float) -> np.ndarray:
        """Empirical-Bayes difference of scores [Q, T(new), T(old)]."""
        x = self.x
        p = x.p
        q = self._adjust(self.full, p)
        eps = 1e-4  # the decision layer's local slope carries the noise of p into q
        slope = (self._adjust(self.full, np.clip(p + eps, 0, 1)) - self._adjust(self.full, np.clip(p - eps, 0, 1))) / (2 * eps)
        y = x.profiles.astype(np.float64)  # [T, K]
        both = np.einsum("qk,tk,sk->qts", w, y, y, optimize=True)  # [Q, T, T] local rate of both right
        d = q[:, :, None] - q[:, None, :]
        raw = p[:, :, None] - p[:, None, :]
        disagree = p[:, :, None] + p[:, None, :] - 2 * both  # local rate of exactly one right
        noise = noise_scale * np.maximum(disagree - raw**2, 0) / n_eff[:, None, None] * (0.5 * (slope[:, :, None] + slope[:, None, :])) ** 2
        mu = d.mean(axis=0)
        v = np.maximum(d.var(axis=0) - noise.mean(axis=0), EPS)
        return (v * d + noise * mu) / (v + noise)

    def _crossfit_views(self, folds: int, repeats: int, seed: int, tau: float) -> list[tuple[Reading, np.ndarray]]:
        """(view to choose with: every anchor but a fold, score matrix [Q, T] from the fold) pairs."""
        x = self.x
        K = x.profiles.shape[1]
        if K < 2 * folds:
            raise ValuationError(f"crossfit with {folds} folds needs at least {2 * folds} anchors, the router has {K}")
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(repeats):
            for fold in np.array_split(rng.permutation(K), folds):
                keep = np.ones(K, dtype=bool)
                keep[fold] = False
                views = []
                for mask in (keep, ~keep):
                    sim = np.where(mask[None], x.sim, np.nan)  # hidden anchors add no evidence mass
                    views.append(Reading(x.p_on_anchors(mask), evidence_mass(sim, tau if x.params is None else x.params.tau), x.profiles[:, mask].mean(axis=1)))
                out.append((views[0], self._adjust(views[1], views[1].p)))
        return out

    def choice(self, cols: Sequence[int], view: Reading | None = None) -> np.ndarray:
        """The model column (an index into ``inputs.models``) the service picks per query [Q] for pool ``cols``."""
        cols = tuple(sorted(cols))
        key = (cols, id(view))
        if key not in self._choices:
            if len(self._choices) > 4096:  # bounds memory over long sweeps (bench value)
                self._choices.clear()
            v = view or self.full
            idx = list(cols)
            costs = None if self.x.costs is None else self.x.costs[idx]
            pick, _, _ = route_batch(
                v.p[:, idx],
                policy=self.x.policy,
                models=[self.x.models[i] for i in idx],
                costs=costs,
                prior=v.prior[idx],
                mass=v.mass,
                params=self.params_for(cols),
            )
            self._choices[key] = np.asarray(idx)[pick]
        return self._choices[key]

    def params_for(self, cols: Sequence[int]) -> DecisionParams | None:
        """The decision layer pool ``cols`` is routed with (the shrinkage and calibration are the same for every pool)."""
        if self.x.params is None or self.x.decision_for is None:
            return self.x.params
        return self.x.decision_for(cols)

    # -- what callers use ---------------------------------------------------------

    def accuracy(self, cols: Sequence[int]) -> float:
        """Estimated routed accuracy (percent) of pool ``cols`` (0 for an empty pool)."""
        if not cols:
            return 0.0
        rows = np.arange(self.n)
        if self.estimator == "crossfit":
            return float(100 * np.mean([s[rows, self.choice(cols, v)].mean() for v, s in self.splits]))
        return float(100 * self.score[rows, self.choice(cols)].mean())

    def gain(self, old: Sequence[int], new: Sequence[int]) -> float:
        """Estimated routed accuracy of pool ``new`` minus pool ``old``, in points."""
        each = self.accuracy(new) - self.accuracy(old)
        if self.estimator in ("eb-pair", "eb-mix") and old and new:
            rows = np.arange(self.n)
            pair = float(100 * self.pair[rows, self.choice(new), self.choice(old)].mean())
            return pair if self.estimator == "eb-pair" else 0.5 * (pair + each)
        return each

    def share(self, cols: Sequence[int], model: int) -> float:
        """Fraction of the queries the service sends to ``model`` in pool ``cols``."""
        return float(np.mean(self.choice(cols) == model)) if cols else 0.0

    def cost(self, cols: Sequence[int]) -> float | None:
        """Mean dollars per query of pool ``cols`` (None without costs)."""
        if self.x.costs is None or not cols:
            return None if self.x.costs is None else 0.0
        return float(self.x.costs[self.choice(cols)].mean())


def _change(valuer: Valuer, old: list[int], new: list[int], model: int, *, share_in: list[int]) -> dict:
    c_old, c_new = valuer.cost(old), valuer.cost(new)
    return {
        "model": valuer.x.models[model],
        "gain": round(valuer.gain(old, new), 4),
        "traffic_share": round(valuer.share(share_in, model), 4),
        "cost_change": None if c_old is None else float(f"{c_new - c_old:.6g}"),
    }


def candidate_gains(valuer: Valuer, pool: Sequence[int], candidates: Sequence[int]) -> list[dict]:
    """Per candidate {"model", "gain", "traffic_share" (of pool + it), "cost_change"}, best gain first."""
    pool = list(pool)
    out = [_change(valuer, pool, sorted([*pool, c]), c, share_in=sorted([*pool, c])) for c in candidates]
    return sorted(out, key=lambda r: -r["gain"])  # stable: ties keep the given order


def removal_gains(valuer: Valuer, pool: Sequence[int]) -> list[dict]:
    """Per pool model the same for removing it ("gain" is usually negative: what it is worth), least loss first.
    ``traffic_share`` is what it takes in the current pool."""
    pool = list(pool)
    out = [_change(valuer, pool, [m for m in pool if m != r], r, share_in=pool) for r in pool]
    return sorted(out, key=lambda r: -r["gain"])


def greedy_pools(valuer: Valuer, models: Sequence[int], *, max_size: int | None = None) -> list[dict]:
    """The greedy best pool of each size 1..N: add the model with the largest estimated gain each step."""
    chosen: list[int] = []
    left = list(models)
    out = []
    acc = 0.0
    for _ in range(min(len(left), max_size or len(left))):
        gains = [valuer.gain(chosen, sorted([*chosen, m])) for m in left]
        best = int(np.argmax(gains))
        acc += gains[best]
        chosen = sorted([*chosen, left.pop(best)])
        cost = valuer.cost(chosen)
        out.append({"size": len(chosen), "models": [valuer.x.models[i] for i in chosen], "accuracy": round(acc, 3), "cost": cost})
    return out
