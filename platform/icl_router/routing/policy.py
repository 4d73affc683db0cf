"""Routing policies (pure numpy): from p(correct) per model to a chosen model.

- ``highest``: the model with the highest p.
- ``threshold``: the cheapest model whose p >= ``threshold`` (none: the highest p).
- ``margin``: the cheapest model whose p >= best p - ``margin``.
- ``budget``: the highest p among models whose cost <= ``budget`` (none: the cheapest).
Ties go to the first model in the given order. Costs are per query (expected dollars).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from icl_router.errors import UserError

PolicyKind = Literal["highest", "threshold", "margin", "budget"]


class PolicyError(UserError):
    """A policy that cannot be applied to this pool."""


@dataclass(frozen=True)
class Policy:
    kind: PolicyKind = "highest"
    threshold: float | None = None
    margin: float | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        need = {"threshold": self.threshold, "margin": self.margin, "budget": self.budget}
        if self.kind not in ("highest", *need):
            raise PolicyError(f"policy kind {self.kind!r} is unknown; use highest, threshold, margin or budget")
        if self.kind in need and need[self.kind] is None:
            raise PolicyError(f"policy {self.kind!r} needs a value for {self.kind!r}, e.g. {{'kind': '{self.kind}', '{self.kind}': 0.5}}")
        for name in ("threshold", "margin"):
            v = need[name]
            if v is not None and not 0.0 <= v <= 1.0:
                raise PolicyError(f"policy {name} must lie in [0, 1], got {v}")
        if self.budget is not None and self.budget < 0:
            raise PolicyError(f"policy budget must be >= 0, got {self.budget}")

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
    if policy.kind == "budget":
        ok = c <= policy.budget
        pick = np.where(ok, p, -np.inf).argmax(axis=1)
        return np.where(ok.any(axis=1), pick, c.argmin(axis=1))
    floor = policy.threshold if policy.kind == "threshold" else p[rows, best] - policy.margin
    ok = p >= np.reshape(floor, (-1, 1)) - 1e-12
    pick = np.where(ok, c, np.inf).argmin(axis=1)
    return np.where(ok.any(axis=1), pick, best)


@dataclass(frozen=True)
class Decision:
    model: str
    order: list[str]  # the chosen model first, then the rest by p descending: the failover order
    p: dict[str, float]
    policy: Policy


def choose(p: dict[str, float], *, policy: Policy = Policy(), costs: dict[str, float] | None = None) -> Decision:
    """Pick one model for one query from ``{model: p(correct)}``."""
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
    probs = np.array([p[m] for m in models])
    chosen = models[int(choose_batch(probs[None], policy=policy, costs=cost_vec)[0])]
    rest = sorted((m for m in models if m != chosen), key=lambda m: -p[m])  # stable: ties keep order
    return Decision(model=chosen, order=[chosen, *rest], p=dict(p), policy=policy)


def restrict(p: dict[str, float], allowed: list[str]) -> dict[str, float]:
    """p for the ``allowed`` models only; an unknown model name is an error."""
    unknown = [m for m in allowed if m not in p]
    if unknown:
        raise PolicyError(f"unknown models {unknown}; the pool has {sorted(p)}")
    return {m: p[m] for m in allowed}
