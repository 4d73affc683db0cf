"""The in-process Python API: load a trained router, score and route queries, register models.

    from icl_router import Router

    router = Router.load("runs/demo/router")
    router.route(["What is 17 * 23?"])[0].model          # the chosen pool model
    router.route(["What is 17 * 23?"], tasks=["math"])    # naming the query's task, where known
    router.scores(["What is 17 * 23?"])                    # p(correct) per model, [Q, T]
    router.register("new-model", profile, cost=0.002)      # by its anchor outcomes; no retraining

This is the code path the service runs: ``routing.online.OnlineRouter`` embeds and
scores (in the service, in the replica that routes), and ``routing.policy.choose``
applies the decision layer and the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_router.errors import UserError
from icl_router.routing.decision import DecisionParams, adjusted
from icl_router.routing.policy import Decision, Policy, PolicyError, choose


class RouterError(UserError):
    """A request the router cannot serve; the message names the argument and the fix."""


@dataclass
class Scores:
    """What the router says about Q queries: p(correct) [Q, T] for ``models``, each query's evidence mass [Q]
    and which queries the decision layer's task layer routes [Q] (their task has anchors)."""

    models: list[str]
    p: np.ndarray
    mass: np.ndarray
    task_rows: np.ndarray

    def as_dicts(self) -> list[dict[str, float]]:
        return [dict(zip(self.models, row.tolist())) for row in self.p]


class Router:
    """A trained router directory, loaded for routing in this process (wraps ``routing.online.OnlineRouter``)."""

    def __init__(self, online: Any, *, costs: dict[str, float] | None = None) -> None:
        self.online = online
        self.costs: dict[str, float] = dict(costs or {})

    @classmethod
    def load(cls, router_dir: str | Path, *, embedder: str | None = None, scoring: str = "auto", costs: dict[str, float] | None = None,
             device: str = "auto", dtype: str = "auto") -> Router:
        """Load ``router_dir`` (icl-router train output) with its registered pool and the embedder its
        anchors were embedded with (``embedder`` names another variant); ``scoring``: ``full`` (the
        router LM with its evidence), ``evidence`` (the evidence head alone, no LM forward) or
        ``auto`` (the evidence path when the router's LM is silent, as the service chooses);
        ``device`` / ``dtype``: the device rule (cuda in bfloat16 where a GPU is visible, else cpu / float32)."""
        from icl_router.model.router_dir import PROFILES_FILE, read_meta, read_profiles
        from icl_router.routing.online import OnlineRouter

        anchors = read_meta(router_dir).anchor_query_ids
        try:
            online = OnlineRouter(router_dir, embedder=embedder, scoring=scoring, device=device, dtype=dtype)
        except ValueError as e:
            raise RouterError(str(e)) from None
        online.sync({m: p.tolist() for m, p in read_profiles(Path(router_dir) / PROFILES_FILE, anchors).items()})
        return cls(online, costs=costs)

    @property
    def decision(self) -> DecisionParams | None:
        """The decision layer for the current pool (its guard refitted on the anchors when the pool
        is not the one it was fitted on); None if the router directory has none."""
        return self.online.decision

    @property
    def models(self) -> list[str]:
        """The registered pool, in registration order."""
        return self.online.models

    def prior(self, models: Sequence[str] | None = None) -> np.ndarray:
        """Each model's accuracy on the anchors [T]: where the decision layer shrinks toward."""
        return np.array([float(np.mean(self.online.profiles[m])) for m in (models or self.models)])

    # ---- scoring -------------------------------------------------------------

    def scores_and_mass(self, texts: Sequence[str], *, models: Sequence[str] | None = None, tasks: Sequence[str | None] | None = None) -> Scores:
        """The router's p(correct) [Q, T] for ``models`` (default: the pool) before the decision layer
        (moved toward the same-task rate for queries whose named task has anchors) and the queries' evidence mass [Q]."""
        texts = _texts(texts)
        models = self._models(models)
        s = self.online.score(texts, tasks=_tasks(tasks, len(texts)))
        cols = [s.models.index(m) for m in models]
        mass = np.full(len(texts), np.inf) if s.mass is None else s.mass if s.model_mass is None else s.model_mass[:, cols]  # [Q] or, with the evidence store, [Q, T]
        return Scores(models, s.p[:, cols], mass, s.task_rows)

    def scores(self, texts: Sequence[str], *, models: Sequence[str] | None = None, tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """p(correct) [Q, T] as the policies see it (after the decision layer, if the router has one)."""
        s = self.scores_and_mass(texts, models=models, tasks=tasks)
        if self.decision is None:
            return s.p
        prior = self.prior(s.models)
        q = np.zeros(s.p.shape)  # [Q, T]
        for layer, rows in self.decision.row_layers(s.task_rows):
            q[rows] = adjusted(s.p[rows], s.mass[rows], prior, layer)
        return q

    # ---- routing -------------------------------------------------------------

    def route(
        self,
        texts: Sequence[str],
        *,
        policy: Policy | str = "highest",
        models: Sequence[str] | None = None,
        tasks: Sequence[str | None] | None = None,
        **overrides: Any,
    ) -> list[Decision]:
        """One Decision per query: the chosen model, the failover order, the p it decided on.

        ``policy``: a Policy or a kind name (``highest``, or ``cost`` with ``cost_weight=``, ...);
        ``models``: route among these only; ``tasks``: each query's task (None where unknown): a
        query whose task some anchor has is routed by the task layer; ``overrides``: the policy's value (threshold, margin,
        budget, cost_weight) and the decision layer's ``min_gain``, ``prior_weight``, ``default_model``.
        """
        pol_args = {k: overrides.pop(k) for k in ("threshold", "margin", "budget", "cost_weight") if k in overrides}
        try:
            pol = policy if isinstance(policy, Policy) else Policy(policy, **pol_args)
            params = self.decision.replace(**overrides) if self.decision is not None and overrides else self.decision
        except UserError as e:
            raise RouterError(str(e)) from None
        if overrides and self.decision is None:
            raise RouterError(f"{sorted(overrides)}: this router has no decision layer (icl_router.json has no 'decision')")
        s = self.scores_and_mass(texts, models=models, tasks=tasks)
        costs = self._costs(s.models) if pol.needs_costs else None
        prior = dict(zip(s.models, self.prior(s.models).tolist()))
        try:
            return [
                choose(dict(zip(s.models, row.tolist())), policy=pol, costs=costs, prior=prior, mass=float(m), params=params, task_row=bool(t))
                for row, m, t in zip(s.p, s.mass, s.task_rows)
            ]
        except PolicyError as e:
            raise RouterError(str(e)) from None

    # ---- the pool ------------------------------------------------------------

    def register(self, name: str, profile: Sequence[bool] | np.ndarray, *, cost: float | None = None) -> None:
        """Add (or replace) a model by its outcomes on the router's K anchors, in anchor order. No training."""
        prof = np.asarray(profile)
        k = len(self.online.anchor_emb)
        if prof.shape != (k,) or not np.isin(prof, (0, 1)).all():
            raise RouterError(f"profile of {name!r} must be {k} booleans, one per anchor in anchor order; got shape {prof.shape}")
        if cost is not None:
            if not np.isfinite(cost) or cost < 0:
                raise RouterError(f"cost of {name!r} must be >= 0 dollars per query, got {cost}")
            self.costs[name] = float(cost)
        self.online.sync({**self.online.profiles, name: prof.astype(bool).tolist()})

    def remove(self, name: str) -> None:
        """Take a model out of the pool."""
        if name not in self.online.profiles:
            raise RouterError(f"model {name!r} is not registered; registered: {self.models}")
        self.online.sync({m: p for m, p in self.online.profiles.items() if m != name})
        self.costs.pop(name, None)

    def _models(self, models: Sequence[str] | None) -> list[str]:
        pool = self.models
        if not pool:
            raise RouterError("the pool is empty: register at least one model (Router.register) before routing")
        if models is None:
            return pool
        unknown = [m for m in models if m not in pool]
        if unknown or not models:
            raise RouterError(f"models: {unknown or 'an empty list'} not in the pool {pool}")
        return list(models)

    def _costs(self, models: list[str]) -> dict[str, float]:
        missing = [m for m in models if m not in self.costs]
        if missing:
            raise RouterError(f"no cost for models {missing}: pass costs= to Router.load or cost= to register")
        return {m: self.costs[m] for m in models}


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise RouterError("texts must be a list of strings, e.g. router.route(['What is 2+2?'])")
    return list(texts)


def _tasks(tasks: Sequence[str | None] | None, n: int) -> list[str | None] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str) or len(tasks) != n or not all(t is None or isinstance(t, str) for t in tasks):
        raise RouterError(f"tasks must name one task (a string, or None where unknown) per text: {n} of them, "
                          "e.g. router.route(['What is 2+2?'], tasks=['math'])")
    return list(tasks)
