"""Fitting a trained router's decision layer (docs/design.md §3) on held-out queries.

The router's p for the held-out queries is computed twice: as the router sees them,
and with the anchors of each query's own k-means cluster hidden from the evidence head
(the LM's logit is kept as it is: it reads the whole profile in context). The second
view stands for queries unlike the anchors; ``decision.fit_decision`` fits on both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from icl_router.routing.decision import (
    EPS,
    DecisionParams,
    View,
    cluster_groups,
    cosine,
    fit_decision,
    hide_own_cluster,
    logit,
)


def router_views(
    router: object, *, texts: Sequence[str], query_emb: np.ndarray, profiles: np.ndarray, clusters: int = 8, seed: int = 0
) -> list[View]:
    """[as seen, own cluster hidden] views of V held-out queries (query_emb [V, E]) against
    T profiles (bool [T, K]); a router without the evidence head gets the first view only."""
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
    groups = cluster_groups(np.concatenate([anchor_emb, query_emb]), n_clusters=clusters, seed=seed)
    g_anchor, g_query = groups[: len(anchor_emb)], groups[len(anchor_emb) :]
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


def fit_router_decision(
    router: object,
    *,
    texts: Sequence[str],
    query_emb: np.ndarray,
    labels: np.ndarray,
    profiles: np.ndarray,
    clusters: int = 8,
    seed: int = 0,
) -> DecisionParams:
    """The decision layer of ``router`` fitted on held-out queries (labels [V, T] of the T profiled models)."""
    views = router_views(router, texts=texts, query_emb=query_emb, profiles=profiles, clusters=clusters, seed=seed)
    prior = np.asarray(profiles, dtype=bool).mean(axis=1)  # [T] each model's accuracy on the anchors
    return fit_decision(views, labels, prior)
