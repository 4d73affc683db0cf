"""Fitting a trained router's decision layer (docs/design.md §3) on held-out queries.

The router's p for the held-out queries is computed twice: as the router sees them,
and with the anchors of each query's own k-means cluster hidden from the evidence head
(the LM's logit is kept as it is: it reads the whole profile in context). The second
view stands for queries unlike the anchors; ``decision.fit_decision`` fits on both.

``refit_guard`` refits the guard's margin for another pool (a model registered or removed) on the
anchors themselves: every routable model has outcomes there, so no held-out labels are
needed and nothing is retrained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import torch

from icl_router.routing.decision import (
    EPS,
    MIN_GAINS,
    DecisionParams,
    View,
    calibrate,
    cluster_groups,
    cosine,
    evidence_mass,
    fit_decision,
    fit_task_layer,
    fitted_default,
    guarded_choice,
    held_out_default,
    hide_own_cluster,
    layer_input,
    logit,
    pick_min_gain,
    shrink,
    with_default,
)


def router_views(
    router: object, *, texts: Sequence[str], query_emb: np.ndarray, profiles: np.ndarray, clusters: int = 8, seed: int = 0,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[View]:
    """[as seen, own cluster hidden] views of V held-out queries (query_emb [V, E]) against
    T profiles (bool [T, K]); a router without the evidence head gets the first view only.
    ``groups``: the (anchor [K], query [V]) cluster ids, when the caller clusters a larger set once
    (``anchor_query_groups``); by default the anchors and these queries are clustered here."""
    from icl_router.routing.scorer import Scorer

    profiles = np.asarray(profiles, dtype=bool)
    pool = {f"m{t}": prof for t, prof in enumerate(profiles)}
    vector = router.layout.query_input == "vector"
    p = Scorer(router, pool).score(list(texts) if not vector else [""] * len(query_emb), query_emb=query_emb if vector else None)  # [V, T]
    anchor_emb = router.anchor_emb.detach().float().cpu().numpy()  # [K, E]
    sim = cosine(query_emb, anchor_emb)  # [V, K]
    views = [View(p.astype(np.float64), sim)]
    ev = router.evidence
    if ev is None:
        return views
    g_anchor, g_query = groups if groups is not None else anchor_query_groups(anchor_emb, query_emb, clusters=clusters, seed=seed)
    hidden = hide_own_cluster(sim, g_query, g_anchor)
    qe = torch.as_tensor(query_emb, dtype=torch.float32)
    prof = torch.as_tensor(profiles)
    d_full = np.zeros_like(views[0].p)  # [V, T] the evidence logit with every anchor
    d_out = np.zeros_like(views[0].p)  # [V, T] ... with the query's own cluster hidden
    with torch.no_grad():
        for g in np.unique(g_query):
            rows = np.flatnonzero(g_query == g)
            keep = np.flatnonzero(g_anchor != g)
            if len(keep) == 0:  # every anchor is in this cluster: nothing stays visible
                keep = np.arange(len(anchor_emb))
            d_full[rows] = ev(qe[rows], router.anchor_emb, prof).T.double().numpy()
            d_out[rows] = ev(qe[rows], router.anchor_emb[keep], prof[:, keep]).T.double().numpy()
    lm = 0.0 if ev.lm_silent else (logit(views[0].p) - d_full)  # the LM's weighted share of the logit
    p_out = 1.0 / (1.0 + np.exp(-(lm + d_out)))
    views.append(View(np.clip(p_out, EPS, 1 - EPS), hidden))
    return views


def anchor_query_groups(anchor_emb: np.ndarray, query_emb: np.ndarray, *, clusters: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means cluster ids of the anchors [K] and of the queries [V], clustered together."""
    groups = cluster_groups(np.concatenate([anchor_emb, query_emb]), n_clusters=clusters, seed=seed)
    return groups[: len(anchor_emb)], groups[len(anchor_emb) :]


def fit_router_decision(
    router: object,
    *,
    texts: Sequence[str],
    query_emb: np.ndarray,
    labels: np.ndarray,
    profiles: np.ndarray,
    models: Sequence[str],
    query_tasks: Sequence[str] | None = None,
    anchor_tasks: Sequence[str] | None = None,
    clusters: int = 8,
    seed: int = 0,
) -> DecisionParams:
    """The decision layer of ``router`` fitted on held-out queries (labels [V, T] of the T profiled
    ``models``); ``fitted["models"]`` records the pool, so another pool refits the guard
    (``refit_guard``, ``routing.online.OnlineRouter.sync``). With the tasks of the held-out queries
    [V] and of the anchors [K], the layer for queries whose task has anchors is fitted too (``task``)."""
    views = router_views(router, texts=texts, query_emb=query_emb, profiles=profiles, clusters=clusters, seed=seed)
    return fit_on_views(views, labels=labels, profiles=profiles, models=models, query_tasks=query_tasks, anchor_tasks=anchor_tasks)


def fit_on_views(
    views: list[View],
    *,
    labels: np.ndarray,
    profiles: np.ndarray,
    models: Sequence[str],
    query_tasks: Sequence[str] | None = None,
    anchor_tasks: Sequence[str] | None = None,
    default: Literal["anchors", "held_out"] = "anchors",
) -> DecisionParams:
    """The decision layer fitted on ``views`` of V held-out queries (``router_views``; labels [V, T]),
    with the task layer when the queries' and the anchors' tasks are given, and the pool recorded.
    ``default``: the guard's default model is the best prior (``anchors``: its accuracy on the anchors,
    chosen when routing), or the best mean accuracy on these queries (``held_out``: stored in both
    layers' ``default_model``, the margins picked for it)."""
    prior = np.asarray(profiles, dtype=bool).mean(axis=1)  # [T] each model's accuracy on the anchors
    col = held_out_default(labels) if default == "held_out" else None
    params = fit_decision(views, labels, prior, default=col)
    task = None
    if query_tasks is not None and anchor_tasks is not None:
        task = fit_task_layer(views, labels, prior, profiles=np.asarray(profiles, dtype=bool), query_tasks=query_tasks, anchor_tasks=anchor_tasks,
                              default=col)
    params = replace(params, fitted={**params.fitted, "models": list(models)}, task=task)
    return params if col is None else with_default(params, list(models)[col])


def refit_guard(
    router: object, params: DecisionParams, *, profiles: np.ndarray, models: Sequence[str] | None = None, anchor_tasks: Sequence[str] | None = None,
    folds: int = 10, seed: int = 0,
) -> DecisionParams:
    """``params`` with ``min_gain`` refitted for the pool of T ``models`` with ``profiles`` (bool [T, K]) on the
    K anchors (the task layer's too, on the anchors whose task other anchors have, given ``anchor_tasks`` [K]).
    A default the fit chose (``decision.fitted_default``) stays if ``models`` has it; else the best prior is
    the default (unnamed ``models``: it is dropped).

    Each fold of anchors is scored by the router's evidence head from the other folds (its own
    outcomes hidden), shrunk and calibrated with the stored parameters; the margin is then picked
    by routed accuracy with the profiles as labels, as ``fit_decision`` picks it on held-out
    queries. The shrinkage and the calibration stay as fitted. A router without the evidence
    head keeps ``params``. With an LM that is not silent only the evidence head's share of the
    logit is used: the LM reads each anchor's own outcome in its context.
    """
    profiles = np.asarray(profiles, dtype=bool)
    if getattr(router, "evidence", None) is None or len(profiles) < 2:
        return pool_default(params, models)
    p, sim = anchor_guard_p(router, profiles=profiles, folds=folds, seed=seed)
    return guard_on_anchors(params, p=p, sim=sim, profiles=profiles, models=models, anchor_tasks=anchor_tasks)


def pool_default(params: DecisionParams, models: Sequence[str] | None) -> DecisionParams:
    """``params`` for the pool ``models``: a default the fit chose that the pool lacks (or with the pool
    unnamed) is dropped from both layers, so the best prior in the pool is the default."""
    if not fitted_default(params) or (models is not None and params.default_model in models):
        return params
    return with_default(params, None)


def anchor_guard_p(router: object, *, profiles: np.ndarray, folds: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The evidence head's k-fold p [K, T] on the anchors for T ``profiles`` and the anchors' cosine
    [K, K] with each anchor's own fold hidden. Each model's column depends on its profile only, so a
    caller valuing many pools computes it once for every model (``PoolDecisions``)."""
    ev = router.evidence
    profiles = np.asarray(profiles, dtype=bool)
    anchor_emb = router.anchor_emb.detach().float()  # [K, E]
    k = len(anchor_emb)
    fold = np.random.default_rng(seed).permutation(k) % min(folds, k)
    prof = torch.as_tensor(profiles)
    p = np.zeros((k, len(profiles)))  # [K, T]
    with torch.no_grad():
        for f in np.unique(fold):
            rows, keep = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            p[rows] = torch.sigmoid(ev(anchor_emb[rows], router.anchor_emb[keep], prof[:, keep])).T.double().numpy()
    a = anchor_emb.numpy()
    sim = np.where(fold[:, None] == fold[None, :], np.nan, cosine(a, a))  # [K, K]: an anchor's own fold hidden
    return p, sim


def guard_on_anchors(
    params: DecisionParams, *, p: np.ndarray, sim: np.ndarray, profiles: np.ndarray, models: Sequence[str] | None = None,
    anchor_tasks: Sequence[str] | None = None,
) -> DecisionParams:
    """``params`` with the margin picked on the anchors from ``anchor_guard_p``'s p [K, T] and sim [K, K]
    (and the task layer's, on the anchors it routes, given ``anchor_tasks`` [K]), for the default the pool
    of T ``models`` routes with (``pool_default``)."""
    profiles = np.asarray(profiles, dtype=bool)
    prior = profiles.mean(axis=1)  # [T]
    params = pool_default(params, models)
    default = list(models).index(params.default_model) if fitted_default(params) else int(np.argmax(prior))
    p = np.clip(p, EPS, 1 - EPS)
    task = params.task
    if task is not None and anchor_tasks is not None:
        li = layer_input(p, sim, params=params, profiles=profiles, query_tasks=anchor_tasks, anchor_tasks=anchor_tasks)
        rows = li.task_rows
        if rows.any():
            task = _guard(task, p=li.p[rows], mass=li.mass[rows], labels=profiles.T[rows], prior=prior, default=default)
    return replace(_guard(params, p=p, mass=evidence_mass(sim, params.tau), labels=profiles.T, prior=prior, default=default), task=task)


def _guard(params: DecisionParams, *, p: np.ndarray, mass: np.ndarray, labels: np.ndarray, prior: np.ndarray, default: int) -> DecisionParams:
    """``params`` with the margin of best routed accuracy on p [N, T] against labels bool [N, T], leaving the ``default`` column."""
    q = calibrate(shrink(p, mass, prior, params.prior_weight), params.calibration)
    labels = labels.astype(np.float64)
    rows = np.arange(len(labels))
    hits = {g: labels[rows, guarded_choice(q, default, g)] for g in MIN_GAINS}  # [N] per margin
    g = pick_min_gain(hits)
    acc = 100 * float(np.nanmean(hits[g]))
    return replace(params, min_gain=g, fitted={**params.fitted, "guard": {"on": "anchors", "models": len(prior), "accuracy": round(acc, 3)}})


def fitted_here(params: DecisionParams, pool: Sequence[str]) -> bool:
    """True when the service routes ``pool`` with ``params`` as stored: the pool it was fitted on
    (``fitted["models"]``), fewer than two models, or a layer that records no pool (used as written)."""
    fitted = params.fitted.get("models")
    return fitted is None or len(pool) < 2 or sorted(fitted) == sorted(pool)


class PoolDecisions:
    """The decision layer the service routes each pool with (``routing.online.OnlineRouter.sync``):
    the stored one for the pool it was fitted on, else its guard refitted on the anchors. For T
    ``models`` with ``profiles`` bool [T, K]; called with a pool's columns, cached per pool."""

    def __init__(self, router: object, params: DecisionParams, *, models: Sequence[str], profiles: np.ndarray) -> None:
        self.params, self.models = params, list(models)
        self.profiles = np.asarray(profiles, dtype=bool)
        self.anchors = None if getattr(router, "evidence", None) is None else anchor_guard_p(router, profiles=self.profiles)
        self._cache: dict[tuple[int, ...], DecisionParams] = {}

    def __call__(self, cols: Sequence[int]) -> DecisionParams:
        key = tuple(sorted(cols))
        if key not in self._cache:
            idx = list(key)
            if self.anchors is None or fitted_here(self.params, [self.models[i] for i in idx]):
                self._cache[key] = self.params
            else:
                p, sim = self.anchors
                self._cache[key] = guard_on_anchors(self.params, p=p[:, idx], sim=sim, profiles=self.profiles[idx], models=[self.models[i] for i in idx])
        return self._cache[key]
