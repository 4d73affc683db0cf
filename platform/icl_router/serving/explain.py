"""Why a request went where it went (``routing.explain: true``): pure, from the plan and the pool.

The explanation (``x-icl-router-explain`` as compact JSON, and ``routing_explanation`` in a
non-streaming answer's body):

    {"top": [{"model", "p", "p_raw", "prior"}, ...],        # the TOP models by the p the choice was made on
     "evidence_mass": S | null,                              # the query's similarity mass to the anchors
     "scored_by": "router" | "prior",                        # prior: the router was down
     "layer": "task" | "plain" | null,                       # which decision layer routed it (null: none)
     "guard": {"default", "min_gain", "best", "gain", "decided"},
     "nearest_anchors": [{"id", "cos", "outcomes": {model: bool}}, ...],
     "policy": "highest", "chosen": "m"}

``guard.decided``: ``none`` (no guard applied: no decision layer, or a policy it does not guard),
``default_is_best`` (the default was the best anyway), ``kept_default`` (another model was predicted
better by ``gain`` <= ``min_gain``: the guard kept the default), ``left_default`` (the gain was above it).
"""

from __future__ import annotations

import json
from typing import Any

TOP = 3


def explanation(plan: Any, *, anchors: tuple[str, ...], profiles: dict[str, tuple[bool, ...]], priors: dict[str, float],
                costs: dict[str, float]) -> dict[str, Any]:
    """``plan``: a ``failover.Plan``; ``anchors``, ``profiles``, ``priors``, ``costs``: the pool's (``registry.PoolSnapshot``)."""
    d = plan.decision
    ranked = sorted(d.p, key=lambda m: -d.p[m])
    top = [{"model": m, "p": round(d.p[m], 4), "p_raw": round(float(plan.raw_p.get(m, float("nan"))), 4),
            "prior": None if m not in priors else round(priors[m], 4)} for m in ranked[:TOP]]
    guard: dict[str, Any] = {"default": d.default, "decided": "none"}
    if d.default is not None and plan.params is not None:
        w = d.policy.cost_weight or 0.0
        u = {m: d.p[m] - w * costs.get(m, 0.0) for m in d.p}
        best = max(u, key=lambda m: u[m])
        gain = u[best] - u[d.default]
        decided = "default_is_best" if best == d.default else ("left_default" if d.model != d.default else "kept_default")
        guard = {"default": d.default, "min_gain": plan.params.min_gain, "best": best, "gain": round(gain, 4), "decided": decided}
    near = []
    for pos, cos in plan.nearest:
        if 0 <= pos < len(anchors):
            near.append({"id": anchors[pos], "cos": cos, "outcomes": {m: bool(prof[pos]) for m, prof in profiles.items() if pos < len(prof)}})
    return {
        "chosen": d.model,
        "policy": d.policy.kind,
        "top": top,
        "evidence_mass": None if plan.mass is None else round(float(plan.mass), 4),
        "scored_by": plan.scored_by,
        "layer": None if plan.params is None else ("task" if plan.task_layer else "plain"),
        "guard": guard,
        "nearest_anchors": near,
    }


def header_value(expl: dict[str, Any]) -> str:
    """The explanation as one header line: compact ASCII JSON."""
    return json.dumps(expl, separators=(",", ":"), ensure_ascii=True)
