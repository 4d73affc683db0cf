"""Routing policies (pure numpy): from p(correct) per model to a chosen model.

- ``highest``: the model with the highest p.
- ``threshold``: the cheapest model whose p >= ``threshold`` (none: the highest p).
- ``margin``: the cheapest model whose p >= best p - ``margin``.
- ``budget``: the highest p among models whose cost <= ``budget`` (none: the cheapest).
- ``cost``: the highest utility ``p - cost_weight * cost`` (quality traded for money at a
  stated rate: ``cost_weight`` is how many points of p one dollar per query is worth).
Ties go to the first model in the given order. Costs are per query (expected dollars).

With a decision layer (``routing.decision``), p is first shrunk toward each model's
prior and calibrated; ``highest`` and ``cost`` then leave the default model only for a
predicted gain above ``min_gain`` (the guard).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np

from icl_router.errors import UserError
from icl_router.kinds import PolicyKind
from icl_router.routing.decision import DecisionParams, adjusted, default_index, guarded_choice


class PolicyError(UserError):
    """A policy that cannot be applied to this pool."""


@dataclass(frozen=True)
class Policy:
    kind: PolicyKind = "highest"
    threshold: float | None = None
    margin: float | None = None
    budget: float | None = None
    cost_weight: float | None = None

    def __post_init__(self) -> None:
        need = {"threshold": self.threshold, "margin": self.margin, "budget": self.budget, "cost": self.cost_weight}
        if self.kind not in get_args(PolicyKind):
            raise PolicyError(f"policy kind {self.kind!r} is unknown; use one of {', '.join(get_args(PolicyKind))}")
        if self.kind in need and need[self.kind] is None:
            field = "cost_weight" if self.kind == "cost" else self.kind
            raise PolicyError(f"policy {self.kind!r} needs a value for {field!r}, e.g. {{'kind': '{self.kind}', '{field}': 0.5}}")
        for name in ("threshold", "margin"):
            v = need[name]
            if v is not None and not 0.0 <= v <= 1.0:
                raise PolicyError(f"policy {name} must lie in [0, 1], got {v}")
        for name in ("budget", "cost_weight"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v >= 0):
                raise PolicyError(f"policy {name} must be >= 0, got {v}")

    @property
    def needs_costs(self) -> bool:
        return self.kind != "highest"


def choose_batch(p: np.ndarray, *, policy: Policy, costs: np.ndarray | None = None) -> np.ndarray:
    """Indices [Q] of the chosen model for p [Q, T]; costs [T] or [Q, T]."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise PolicyError("the pool is empty: register at least one model before routing")
    best = p.argmax(axis=1)  # first max wins ties
    if policy.kind == "highest":
        return best
    if costs is None:
        raise PolicyError(f"policy {policy.kind!r} needs a cost per model; set cost in each model's config")
    c = np.broadcast_to(np.asarray(costs, dtype=np.float64), p.shape)
    rows = np.arange(len(p))
    if policy.kind == "cost":
        return (p - policy.cost_weight * c).argmax(axis=1)
    if policy.kind == "budget":
        ok = c <= policy.budget
        pick = np.where(ok, p, -np.inf).argmax(axis=1)
        return np.where(ok.any(axis=1), pick, c.argmin(axis=1))
    floor = policy.threshold if policy.kind == "threshold" else p[rows, best] - policy.margin
    ok = p >= np.reshape(floor, (-1, 1)) - 1e-12
    pick = np.where(ok, c, np.inf).argmin(axis=1)
    return np.where(ok.any(axis=1), pick, best)


def route_batch(
    p: np.ndarray,
    *,
    policy: Policy,
    models: list[str],
    costs: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    mass: np.ndarray | None = None,
    params: DecisionParams | None = None,
    task_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(chosen column [Q], the p it decided on [Q, T], the default column or None) for the
    router's p [Q, T]. With ``params`` (and the models' priors [T], the queries' evidence
    mass [Q]) the decision layer adjusts p and guards the default under ``highest`` / ``cost``.
    ``task_rows`` [Q] marks the queries routed by the task layer (``decision.layer_input`` gives
    them with p and mass)."""
    if params is None:
        return choose_batch(p, policy=policy, costs=costs), np.asarray(p, dtype=np.float64), None
    if prior is None or mass is None:
        raise PolicyError("the decision layer needs each model's prior and each query's evidence mass")
    p, mass = np.asarray(p, dtype=np.float64), np.asarray(mass)
    pick, q, default = np.zeros(len(p), dtype=np.int64), np.zeros_like(p), None
    for layer, rows in params.row_layers(np.zeros(len(p), dtype=bool) if task_rows is None else task_rows):
        sub_costs = costs[rows] if costs is not None and np.ndim(costs) == 2 else costs
        pick[rows], q[rows], d = _route_layer(p[rows], policy=policy, models=models, costs=sub_costs, prior=prior, mass=mass[rows], params=layer)
        default = d if default is None else default  # the plain layer's when it routes any row: overrides set both alike
    return pick, q, default


def _route_layer(
    p: np.ndarray, *, policy: Policy, models: list[str], costs: np.ndarray | None, prior: np.ndarray, mass: np.ndarray, params: DecisionParams
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``route_batch`` for rows that one layer routes."""
    q = adjusted(p, mass, prior, params)
    if policy.kind not in ("highest", "cost"):
        return choose_batch(q, policy=policy, costs=costs), q, None
    weight = policy.cost_weight or 0.0
    if weight and costs is None:
        raise PolicyError("policy 'cost' needs a cost per model; set cost in each model's config")
    default = default_index(models, prior, params, cost_weight=weight, costs=costs)
    return guarded_choice(q, default, params.min_gain, cost_weight=weight, costs=costs), q, default


@dataclass(frozen=True)
class Decision:
    model: str
    order: list[str]  # the chosen model first, then the rest by p descending: the failover order
    p: dict[str, float]  # the p the choice was made on (after the decision layer, if any)
    policy: Policy
    default: str | None = None  # the guard's default model (None: no guard applied)


def choose(
    p: dict[str, float],
    *,
    policy: Policy = Policy(),
    costs: dict[str, float] | None = None,
    prior: dict[str, float] | None = None,
    mass: float | dict[str, float] | None = None,
    params: DecisionParams | None = None,
    task_row: bool = False,
) -> Decision:
    """Pick one model for one query from ``{model: p(correct)}`` (with a decision layer: ``prior``
    per model, the query's evidence ``mass`` (or each model's, with the evidence store) and ``params``; ``task_row``: p and mass are the task
    layer's, ``decision.layer_input``)."""
    if not p:
        raise PolicyError("the pool is empty: register at least one model before routing")
    models = list(p)
    cost_vec = None
    if policy.needs_costs:
        if costs is None:
            raise PolicyError(f"policy {policy.kind!r} needs a cost per model; set cost in each model's config")
        unknown = [m for m in models if m not in costs]
        if unknown:
            raise PolicyError(f"no cost for models {unknown}; every pool model needs a cost for policy {policy.kind!r}")
        cost_vec = np.array([costs[m] for m in models])
    prior_vec = None
    if params is not None:
        missing = [m for m in models if prior is None or m not in prior]
        if missing:
            raise PolicyError(f"no prior (profile accuracy) for models {missing}")
        prior_vec = np.array([prior[m] for m in models])
    probs = np.array([p[m] for m in models])
    mass_arr = None if mass is None else np.array([[mass[m] for m in models]]) if isinstance(mass, dict) else np.array([mass])
    pick, q, default = route_batch(
        probs[None], policy=policy, models=models, costs=cost_vec, prior=prior_vec, mass=mass_arr, params=params,
        task_rows=np.array([task_row]),
    )
    chosen = models[int(pick[0])]
    final = dict(zip(models, q[0].tolist()))
    rest = sorted((m for m in models if m != chosen), key=lambda m: -final[m])  # stable: ties keep order
    return Decision(model=chosen, order=[chosen, *rest], p=final, policy=policy, default=None if default is None else models[default])

