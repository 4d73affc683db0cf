"""Cost/quality curves and RouterBench's AIQ.

RouterBench (Hu et al., arXiv 2403.12031, section 3): a router swept over its
cost parameter gives points (cost, quality); mixing two routers at random
reaches every point between them, so the router's curve is the non-decreasing
convex hull of its points, R~(c). AIQ = 1/(c_max - c_min) * integral of R~(c)
from c_min to c_max. All methods of one report share [c_min, c_max]: the cost
range of the pool's single models.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def hull_curve(points: np.ndarray) -> np.ndarray:
    """[n, 2] (cost, quality) points -> [h, 2] vertices of their non-decreasing upper convex hull, by cost."""
    pts = np.asarray(points, dtype=np.float64)
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]  # by cost, best quality first at equal cost
    hull: list[np.ndarray] = []
    for p in pts:
        if hull and p[1] <= hull[-1][1]:
            continue  # costs more, gives no more: never on a non-decreasing frontier
        # pop while the last vertex lies on or under the chord from the one before it to p
        while len(hull) >= 2:
            (ax, ay), (bx, by) = hull[-1] - hull[-2], p - hull[-2]
            if ax * by - ay * bx < 0:
                break
            hull.pop()
        hull.append(p)
    return np.array(hull)


def aiq(points: np.ndarray, *, c_min: float, c_max: float) -> float:
    """Mean of the hull curve over [c_min, c_max]; 0 below the cheapest point, flat after the last."""
    h = hull_curve(points)
    grid = np.linspace(c_min, c_max, 2001)
    q = np.interp(grid, h[:, 0], h[:, 1], left=0.0, right=h[-1, 1])
    q[grid < h[0, 0]] = 0.0
    return float(np.trapezoid(q, grid) / (c_max - c_min))


def utility_curve(
    p: np.ndarray,
    labels: np.ndarray,
    costs: np.ndarray,
    *,
    est_costs: np.ndarray,
    cost_weights: list[float],
    choose: Callable[[np.ndarray, float], np.ndarray] | None = None,
) -> list[dict]:
    """The ``cost`` policy (the highest p - cost_weight * cost) swept over ``cost_weights``.

    p, labels, costs: [Q, T] (costs: the realised per-query cost); est_costs [T]: the
    per-model cost the policy decides on. ``choose(p, cost_weight) -> [Q]`` replaces the
    plain argmax (a decision layer's guard). -> [{cost_weight, cost, quality}]
    """
    rows = np.arange(len(p))
    out = []
    for w in cost_weights:
        pick = choose(p, w) if choose is not None else (p - w * est_costs).argmax(axis=1)
        out.append({"cost_weight": float(w), "cost": float(np.nanmean(costs[rows, pick])), "quality": float(100 * np.nanmean(labels[rows, pick]))})
    return out


def quality_at_cost(points: np.ndarray, cost: float) -> float:
    """The hull curve's quality at ``cost`` (mixing two routing points reaches any point between them)."""
    h = hull_curve(points)
    if cost < h[0, 0]:
        return float("nan")
    return float(np.interp(cost, h[:, 0], h[:, 1]))


def cost_to_reach(points: np.ndarray, quality: float) -> float | None:
    """The least cost at which the hull curve reaches ``quality`` (None: it never does)."""
    h = hull_curve(points)
    if h[-1, 1] < quality:
        return None
    i = int(np.argmax(h[:, 1] >= quality))
    if i == 0:
        return float(h[0, 0])
    (c0, q0), (c1, q1) = h[i - 1], h[i]
    return float(c0 + (quality - q0) * (c1 - c0) / (q1 - q0))
