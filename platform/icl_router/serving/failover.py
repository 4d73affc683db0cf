"""Routing one request and failing over down the order (pure: no Ray, no FastAPI).

The ingress injects the two calls that reach Ray: ``score(text)`` (the router deployment)
and ``call(model)`` (a pool model's first output). Both are bounded by timeouts, and both
go through the circuit breakers (``circuits.Circuits``): a part known to be down is skipped
at once and named in ``x-icl-router-fallback`` with its reason.

- ``resolve`` and ``candidates``: the request's ``routing`` field against the pool: its policy,
  its decision parameters, the models it may go to (a bad value is an ``ApiError``).
- ``plan``: the router's p for the candidates (or, with the router down, each model's prior:
  its profile accuracy), then the policy and the decision layer: the failover order.
- ``failover``: the order, model by model, until one answers; a model that raises, sends a
  5xx or is silent for ``timeout_s`` opens its circuit and the next one is tried, and every
  request waiting on it at that moment moves on too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from icl_router.routing.decision import DecisionError, DecisionParams
from icl_router.routing.policy import Decision, Policy, PolicyError, choose
from icl_router.serving.api_errors import ApiError
from icl_router.serving.circuits import CircuitOpened, Circuits
from icl_router.serving.protocol import RoutingOptions

ROUTER = "router"  # the router deployment's name in the circuits and in x-icl-router-fallback
POLICY_FIELDS = ("threshold", "margin", "budget", "cost_weight")
POLICY_OF = {"threshold": "threshold", "margin": "margin", "budget": "budget", "cost_weight": "cost"}  # the policy each value is for


@dataclass(frozen=True)
class RouterScores:
    """What the router deployment returns for one query."""

    p: dict[str, float]  # raw p(correct) per model
    mass: float | None = None  # evidence mass of the query (routing.decision); None: no decision layer
    ms: dict[str, float] = field(default_factory=dict)  # where the router replica spent the time
    min_gain: float | None = None  # the guard's margin for the replica's pool (refitted when the pool changed), of the query's layer
    task_row: bool = False  # p and mass are the decision layer's task layer's (the query's task has anchors)
    nearest: tuple[tuple[int, float], ...] = ()  # (anchor position, cosine) of the query's nearest anchors, when asked (routing.explain)
    model_mass: dict[str, float] | None = None  # each model's evidence mass, anchors + evidence store (routing/evidence_store.py)
    embedding: tuple[float, ...] | None = None  # the query's embedding, when the decision log keeps it


@dataclass(frozen=True)
class Plan:
    decision: Decision
    scored_by: Literal["router", "prior"]
    skipped: list[tuple[str, str]]  # (part, reason): the router, if it could not score
    scoring_ms: float
    timing: dict[str, float]
    params: DecisionParams | None = None  # the decision layer as used (the pool's guard, the request's overrides)
    task_layer: bool = False  # ``params`` is the task layer (the query named a task the anchors have)
    mass: float | None = None  # the query's evidence mass (the anchors'), as the decision layer used it
    embedding: tuple[float, ...] | None = None  # the router's embedding of the query, when it returned one
    raw_p: dict[str, float] = field(default_factory=dict)  # p before the decision layer (the router's, or the priors)
    nearest: tuple[tuple[int, float], ...] = ()  # RouterScores.nearest


class ModelRefused(Exception):
    """The model answered with a 4xx: the request's fault, no other model would do better."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Exhausted(Exception):
    """No model of the order answered; ``skipped`` says why, model by model."""

    def __init__(self, skipped: list[tuple[str, str]]) -> None:
        super().__init__(", ".join(f"{m}:{r}" for m, r in skipped))
        self.skipped = skipped


@dataclass
class Served:
    model: str
    first: Any  # the model's first output (the whole answer unless streaming)
    rest: Any  # what ``call`` returned beside it (the stream's continuation)
    skipped: list[tuple[str, str]]



def resolve(r: RoutingOptions, snap: Any, *, default: Policy) -> tuple[Policy, DecisionParams | None]:
    """This request's policy and decision parameters: the service's default policy and the router
    directory's decision layer (``snap``: a ``registry.PoolSnapshot``; its ``decision``), with the request's ``routing`` overrides."""
    given = {k: getattr(r, k) for k in POLICY_FIELDS if getattr(r, k) is not None}
    kind = r.policy or default.kind
    stray = [k for k in given if POLICY_OF[k] != kind]
    if stray:
        raise ApiError(400, f"routing.{stray[0]} belongs to policy {POLICY_OF[stray[0]]!r}, and this request's policy is {kind!r}; "
                       "set routing.policy", code="invalid_value", param=f"routing.{stray[0]}")
    values = {k: getattr(default, k) for k in POLICY_FIELDS} if r.policy is None else {}
    try:
        policy = Policy(kind, **{**values, **given})
    except PolicyError as e:
        raise ApiError(400, f"routing: {e}", code="invalid_value", param="routing.policy") from None
    params = snap.decision
    for name, value in r.decision_overrides().items():
        if params is None:
            raise ApiError(400, f"routing.{name}: this router has no decision layer (its icl_router.json has no 'decision'); remove {name}",
                           code="invalid_value", param=f"routing.{name}")
        try:
            params = params.replace(**{name: value})
        except DecisionError as e:
            raise ApiError(400, f"routing.{name}: {e}", code="invalid_value", param=f"routing.{name}") from None
    return policy, params


def candidates(r: RoutingOptions, snap: Any, *, exclude: str | None = None) -> list[str]:
    """The models this request may be routed to: the routable pool (``snap.routable``), or the part
    of it that ``routing.models`` names; unknown names are a 400, nothing routable a 503."""
    routable = [m for m in snap.routable if m != exclude]
    if r.models:
        unknown = sorted({m for m in r.models if m not in snap.models})
        if unknown:
            raise ApiError(400, f"routing.models: unknown models {unknown}; the pool has {sorted(snap.models)}", code="invalid_value",
                           param="routing.models")
        cands = [m for m in dict.fromkeys(r.models) if m in routable]
        if not cands:
            raise ApiError(400, f"routing.models: none of {r.models} is routable (ready, with a profile); routable: {routable}",
                           code="invalid_value", param="routing.models")
    else:
        cands = routable
    if not cands:
        raise ApiError(503, "no routable model: register one with POST /admin/models", code="no_routable_model", type_="server_error")
    if r.default_model is not None and r.default_model not in cands:
        raise ApiError(400, f"routing.default_model: {r.default_model!r} is not among the candidates {cands}", code="invalid_value",
                       param="routing.default_model")
    return cands

async def plan(
    text: str,
    *,
    candidates: list[str],
    priors: dict[str, float],
    costs: dict[str, float],
    policy: Policy,
    params: DecisionParams | None,
    score: Callable[[str], Awaitable[RouterScores]],
    circuits: Circuits,
    timeout_s: float,
    pinned: bool = False,
) -> Plan:
    """The decision for one query among ``candidates`` (non-empty; each has a prior).

    The guard's margin is the router replica's for its pool (``RouterScores.min_gain``) unless the
    request set it (``pinned``).

    With the router down (its circuit open, or the call failing or slower than ``timeout_s``)
    the p's are the priors, so the policy picks by profile accuracy, not by a coin."""
    skipped: list[tuple[str, str]] = []
    scores: RouterScores | None = None
    t0 = time.perf_counter()
    if circuits.is_open(ROUTER):
        skipped.append((ROUTER, "open_circuit"))
    else:
        try:
            scores = await circuits.call(ROUTER, score(text), timeout_s=timeout_s)
        except CircuitOpened:  # another request found the router down meanwhile
            skipped.append((ROUTER, "open_circuit"))
        except TimeoutError:
            circuits.trip(ROUTER, "timeout")
            skipped.append((ROUTER, "timeout"))
        except Exception:
            circuits.trip(ROUTER, "error")
            skipped.append((ROUTER, "error"))
    scoring_ms = (time.perf_counter() - t0) * 1e3
    if scores is not None:
        p = {m: scores.p.get(m, priors[m]) for m in candidates}  # a model the replica has not loaded yet: its prior
        mass = scores.mass
        if mass is not None and scores.model_mass is not None:  # the evidence store: each model its own mass
            mass = {m: scores.model_mass.get(m, scores.mass) for m in candidates}
    else:
        p = {m: priors[m] for m in candidates}
        mass = 0.0  # no evidence about the query: the decision layer keeps the priors
    use = params if params is not None and mass is not None else None
    if use is not None and scores is not None:
        use = use.for_task(scores.task_row)
    if use is not None and not pinned and scores is not None and scores.min_gain is not None:
        use = use.replace(min_gain=scores.min_gain)
    prior = {m: priors[m] for m in candidates}
    if use is not None and use.default_model is not None and use.default_model not in candidates:
        use = use.replace(default_model=None)  # the configured default is not a candidate here: the best prior is
    decision = choose(p, policy=policy, costs=costs, prior=prior if use else None, mass=mass if use else None, params=use)
    return Plan(decision, "router" if scores is not None else "prior", skipped, scoring_ms, dict(scores.ms) if scores else {}, use,
                task_layer=use is not None and scores is not None and scores.task_row,
                mass=None if scores is None else scores.mass, embedding=None if scores is None else scores.embedding, raw_p=p,
                nearest=scores.nearest if scores is not None else ())


async def failover(
    order: list[str],
    *,
    call: Callable[[str], Awaitable[tuple[Any, Any]]],
    circuits: Circuits,
    timeout_s: float,
    more: Callable[[], Awaitable[list[str]]] | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> Served:
    """Try ``order`` until a model answers: ``call(model)`` returns (first output, rest) or raises.

    Open circuits are skipped without a call. ``ModelRefused`` passes through (no failover).
    When ``order`` runs out, ``more()`` (if given, once) supplies further models: a direct
    request's opt-in fallback, routed only when the named model fails. Raises ``Exhausted``.
    ``skipped`` (appended to in place, so ``more`` may add to it too) starts the record of skips."""
    order = list(order)
    skipped = skipped if skipped is not None else []
    i, extended = 0, False
    while True:
        if i == len(order):
            if more is not None and not extended:
                extended = True
                order += [m for m in await more() if m not in order]
                continue
            raise Exhausted(skipped)
        model = order[i]
        i += 1
        if circuits.is_open(model):
            skipped.append((model, "open_circuit"))
            continue
        try:
            first, rest = await circuits.call(model, call(model), timeout_s=timeout_s)
        except ModelRefused:
            raise
        except CircuitOpened:  # another request found it down while this one waited: move on at once
            skipped.append((model, "open_circuit"))
            continue
        except TimeoutError:
            reason = "timeout"
        except Exception:
            reason = "error"
        else:
            return Served(model, first, rest, skipped)
        circuits.trip(model, reason)
        skipped.append((model, reason))


def fallback_header(skipped: list[tuple[str, str]]) -> str:
    return ";".join(f"{m}:{r}" for m, r in skipped)
