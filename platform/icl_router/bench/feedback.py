"""Learning from traffic: the standard protocol's test stream replayed with outcomes joining the evidence store.

Per seed (standard split of the LLMRouter data, K anchors on its train part, MiniLM embeddings):
the platform's kernel evidence (the anchor-evidence head at its initial weights: kNN on the profiles,
softmax over cosine at tau 0.1, ``routing/fast.py``) with the decision layer fitted on a share
(``--fit-fraction``) of the non-anchor train rows, as the train job fits it (as seen, and with each
query's own k-means cluster of anchors hidden). The test stream (ID test + OOD, shuffled with the
seed) is routed one query at a time, each before its outcomes are known; after it, per scenario:

- ``static``: nothing is added (anchors only);
- ``reprofile``: every pool model's outcome on the query joins the store (``icl-router reprofile``
  on all the traffic);
- ``reprofile_30``: the same on a seeded 30% sample of the queries;
- ``routed_only``: only the routed model's outcome (``POST /v1/feedback``), with the store's guard
  for partial outcomes (``--partial``, default ``cap``); every other guard of
  ``routing/evidence_store.py`` is measured beside it (``routed_only_<partial>``).

The store joins the router's p through ``evidence_store.store_kernel`` and ``combine`` at the decision
layer's tau, then the decision layer (shrinkage, calibration, guard): the code the service runs.
Routed accuracy is the mean correctness of the chosen model over the stream's ID and OOD queries.
``curve``: the accuracy of each scenario on successive windows of the stream. Targets (issue 25):
reprofile OOD >= static OOD + 1.0, reprofile ID >= static ID - 0.5, routed-only OOD >= static OOD - 0.5.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
SCENARIOS = ("static", "routed_only", "reprofile", "reprofile_30")
PARTIALS = ("cap", "discount", "raw")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (../shared/data)")
    p.add_argument("--cache-dir", default="runs/cache/evaluate", help="imported + embedded datasets (shared with evaluate)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--k", type=int, default=1000, help="anchors")
    p.add_argument("--fit-fraction", type=float, default=0.2, help="share of the non-anchor train rows the decision layer is fitted on")
    p.add_argument("--sample", type=float, default=0.3, help="share of the stream re-profiled in reprofile_30")
    p.add_argument("--partial", default="cap", choices=PARTIALS, help="the store's guard for routed-only outcomes reported as routed_only")
    p.add_argument("--discount", type=float, default=0.25, help="partial=discount: the weight of a routed-only outcome")
    p.add_argument("--window", type=int, default=250, help="stream queries per point of the curve")
    p.add_argument("--plot", default="docs/feedback-bench.png", help="PNG of the curve ('' for none)")


def say(msg: str) -> None:
    sys.stderr.write(f"[bench feedback {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load(args: argparse.Namespace, seed: int) -> Any:
    import dataclasses

    from icl_router.config import SplitConfig
    from icl_router.data.anchors import select_anchors
    from icl_router.data.routing_set import load_routing_set
    from icl_router.evaluation.run import ensure_embeddings, open_dataset, resolve

    ds = open_dataset(resolve(args.data, "routing/llmrouter"), "llmrouter", cache_dir=args.cache_dir)
    embedder = "all-MiniLM-L6-v2"
    ensure_embeddings(ds, embedder=embedder, name=embedder)
    rs = load_routing_set(ds, split=SplitConfig(name="standard", seed=seed), embedder=embedder, models=ds.model_ids())
    train = rs.rows("train")
    table = select_anchors(rs.labels[train], [rs.query_ids[i] for i in train], k=args.k, seed=seed)
    return dataclasses.replace(rs, anchor_ids=table.column("query_id").to_pylist())


def kernel_scorer(anchor_emb: np.ndarray, profiles: np.ndarray) -> Any:
    """The anchor-evidence head at its initial weights (the middle temperature alone) over ``profiles`` [T, K]."""
    from icl_router.model.evidence import TAUS
    from icl_router.routing.fast import EvidenceScorer

    weight = np.zeros(len(TAUS) + 1)
    weight[1] = 1.0
    return EvidenceScorer(anchor_emb, weight, 0.0, TAUS, {f"m{t}": prof for t, prof in enumerate(profiles)})


def fit_layer(rs: Any, profiles: np.ndarray, rows: np.ndarray, *, seed: int) -> Any:
    """The decision layer on held-out rows, from the two views the train job fits on."""
    from icl_router.routing.decision import View, cluster_groups, cosine, fit_decision, hide_own_cluster

    anchor_emb = rs.embeddings[rs.anchor_rows]
    qe = rs.embeddings[rows]
    sim = cosine(qe, anchor_emb)
    p_full = kernel_scorer(anchor_emb, profiles).score(query_emb=qe, sim=sim).astype(np.float64)
    groups = cluster_groups(np.concatenate([anchor_emb, qe]), n_clusters=8, seed=seed)
    ga, gq = groups[: len(anchor_emb)], groups[len(anchor_emb):]
    p_out = np.zeros_like(p_full)
    for g in np.unique(gq):
        r = np.flatnonzero(gq == g)
        keep = np.flatnonzero(ga != g)
        keep = keep if len(keep) else np.arange(len(anchor_emb))
        p_out[r] = kernel_scorer(anchor_emb[keep], profiles[:, keep]).score(query_emb=qe[r]).astype(np.float64)
    views = [View(p_full, sim), View(np.clip(p_out, 1e-6, 1 - 1e-6), hide_own_cluster(sim, gq, ga))]
    return fit_decision(views, rs.labels[rows], profiles.mean(axis=1))


def refit_guard_on_store(p: np.ndarray, mass: np.ndarray, sim_ss: np.ndarray, labels: np.ndarray, cols: np.ndarray, *, prior: np.ndarray,
                         params: Any, models: list[str]) -> Any:
    """``params`` with min_gain picked by routed accuracy on the store's queries ``cols`` (every model's outcome
    known), each routed with the store's other rows (leave one out): the guard refitted on the grown evidence."""
    from icl_router.routing.decision import MIN_GAINS
    from icl_router.routing.evidence_store import combine, store_kernel
    from icl_router.routing.policy import Policy, route_batch

    sim = sim_ss[np.ix_(cols, cols)].copy()
    np.fill_diagonal(sim, -np.inf)  # a query's own row is hidden: weight 0
    E, W = store_kernel(sim, labels[cols].T, params.tau)
    q, m = combine(p[cols], mass[cols], E, W)
    acc = {}
    for g in MIN_GAINS:
        pick, _, _ = route_batch(q, policy=Policy("highest"), models=models, prior=prior, mass=m, params=params.replace(min_gain=g))
        acc[g] = float(labels[cols][np.arange(len(cols)), pick].mean())
    g = max(MIN_GAINS, key=lambda x: (round(acc[x], 9), x))
    return params.replace(min_gain=g)


def replay(p: np.ndarray, mass: np.ndarray, sim_ss: np.ndarray, labels: np.ndarray, *, prior: np.ndarray, params: Any, models: list[str],
           mode: str, partial: str, discount: float, sample: np.ndarray | None, refit_every: int = 0) -> np.ndarray:
    """Route the stream (p [S, T], anchor mass [S], stream-to-stream cosine [S, S], labels [S, T]) one query
    at a time; after each, add outcomes per ``mode`` (``refit_every`` > 0: the guard refitted on the store's
    full rows that often, once it holds 100). The chosen column per query [S]."""
    from icl_router.routing.evidence_store import combine, store_kernel
    from icl_router.routing.policy import Policy, route_batch

    fitted = params

    n, t = p.shape
    store = np.full((t, n), np.nan)  # [T, S]: outcomes known so far, by stream position
    filled = np.zeros(n, dtype=bool)
    chosen = np.zeros(n, dtype=np.int64)
    policy = Policy("highest")
    for i in range(n):
        pi, mi = p[i : i + 1], mass[i : i + 1]
        m2 = mi
        if filled.any():
            cols = np.flatnonzero(filled)
            E, W = store_kernel(sim_ss[i : i + 1, cols], store[:, cols], params.tau, partial=partial, discount=discount)
            pi, m2 = combine(pi, mi, E, W)
        pick, _, _ = route_batch(pi, policy=policy, models=models, prior=prior, mass=m2, params=params)
        c = int(pick[0])
        if refit_every and i and i % refit_every == 0:
            full = np.flatnonzero(filled & ~np.isnan(store).any(axis=0))
            if len(full) >= 100:
                params = refit_guard_on_store(p, mass, sim_ss, labels, full, prior=prior, params=fitted, models=models)
        chosen[i] = c
        if mode == "static":
            continue
        if mode == "routed_only":
            store[c, i] = labels[i, c]
        elif mode == "reprofile" or (mode == "reprofile_30" and sample[i]):
            store[:, i] = labels[i]
        else:
            continue
        filled[i] = True
    return chosen


def run(args: argparse.Namespace) -> dict:
    from icl_router.routing.decision import cosine, evidence_mass

    seeds = [int(s) for s in str(args.seeds).split(",")]
    per: dict[str, list[dict]] = {}
    curves: dict[str, list[np.ndarray]] = {}
    params_used = []
    t0 = time.perf_counter()
    for seed in seeds:
        rs = load(args, seed)
        profiles = rs.profiles()  # [T, K]
        prior = profiles.mean(axis=1)
        rng = np.random.default_rng(seed)
        held = rs.rows("train")
        held = held[~np.isin(held, rs.anchor_rows)]
        fit_rows = np.sort(rng.choice(held, max(1, int(args.fit_fraction * len(held))), replace=False))
        params = fit_layer(rs, profiles, fit_rows, seed=seed)
        params_used.append({"seed": seed, "tau": params.tau, "prior_weight": params.prior_weight, "min_gain": params.min_gain,
                            "calibration": [round(x, 4) for x in params.calibration]})
        id_rows, ood_rows = rs.rows("test"), rs.rows("ood")
        stream = np.concatenate([id_rows, ood_rows])
        stream = stream[np.random.RandomState(seed).permutation(len(stream))]
        is_ood = np.isin(stream, ood_rows)
        emb = rs.embeddings[stream]
        anchor_emb = rs.embeddings[rs.anchor_rows]
        sim_a = cosine(emb, anchor_emb)
        p = kernel_scorer(anchor_emb, profiles).score(query_emb=emb, sim=sim_a).astype(np.float64)
        mass = evidence_mass(sim_a, params.tau)
        sim_ss = cosine(emb, emb)
        labels = np.nan_to_num(rs.labels[stream])
        sample = np.random.default_rng(1000 + seed).random(len(stream)) < args.sample
        runs = {"static": ("static", args.partial), "routed_only": ("routed_only", args.partial), "reprofile": ("reprofile", args.partial),
                "reprofile_30": ("reprofile_30", args.partial)}
        runs.update({f"routed_only_{x}": ("routed_only", x) for x in PARTIALS})
        runs.update({"reprofile_refit": ("reprofile", args.partial), "reprofile_30_refit": ("reprofile_30", args.partial)})
        for name, (mode, partial) in runs.items():
            ch = replay(p, mass, sim_ss, labels, prior=prior, params=params, models=rs.models, mode=mode, partial=partial,
                        discount=args.discount, sample=sample, refit_every=args.window if name.endswith("_refit") else 0)
            hit = labels[np.arange(len(stream)), ch]
            per.setdefault(name, []).append({"seed": seed, "id": 100 * float(hit[~is_ood].mean()), "ood": 100 * float(hit[is_ood].mean())})
            curves.setdefault(name, []).append(np.stack([hit, is_ood]))
            say(f"seed {seed} {name}: ID {per[name][-1]['id']:.2f} OOD {per[name][-1]['ood']:.2f} ({time.perf_counter() - t0:.0f} s)")

    def summary(rows: list[dict]) -> dict:
        ids, oods = np.array([r["id"] for r in rows]), np.array([r["ood"] for r in rows])
        return {"id": round(float(ids.mean()), 2), "ood": round(float(oods.mean()), 2), "id_std": round(float(ids.std()), 2),
                "ood_std": round(float(oods.std()), 2), "seeds": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}

    out: dict[str, Any] = {name: summary(per[name]) for name in SCENARIOS}
    out["variants"] = {name: summary(rows) for name, rows in per.items() if name not in SCENARIOS}
    n = min(c.shape[1] for cs in curves.values() for c in cs)
    curve = []
    for end in [*range(args.window, n, args.window), n]:
        start = end - args.window if end % args.window == 0 else (end // args.window) * args.window
        point: dict[str, Any] = {"from": int(start), "to": int(end)}
        for name in SCENARIOS:
            hits = np.concatenate([c[0, start:end][c[1, start:end] == 1] for c in curves[name]])
            point[name] = round(100 * float(hits.mean()), 2) if len(hits) else None
        curve.append(point)
    out["curve"] = curve  # OOD accuracy per window of the stream, all seeds pooled
    s, r, ro = out["static"], out["reprofile"], out["routed_only"]
    out["targets"] = {
        "reprofile_ood_ge_static_plus_1": bool(r["ood"] >= s["ood"] + 1.0),
        "reprofile_id_ge_static_minus_0.5": bool(r["id"] >= s["id"] - 0.5),
        "routed_only_ood_ge_static_minus_0.5": bool(ro["ood"] >= s["ood"] - 0.5),
    }
    out["setup"] = {"seeds": seeds, "k": args.k, "fit_fraction": args.fit_fraction, "sample": args.sample, "partial": args.partial,
                    "discount": args.discount, "stream": int(n), "decision": params_used, "seconds": round(time.perf_counter() - t0, 1)}
    if args.plot:
        plot(out, args.plot)
        out["plot"] = args.plot
    return out


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [pt["to"] for pt in out["curve"]]
    for name in SCENARIOS:
        ax.plot(xs, [pt[name] for pt in out["curve"]], marker="o", label=f"{name} (OOD {out[name]['ood']:.1f}, ID {out[name]['id']:.1f})")
    ax.set_xlabel("stream position (queries routed so far)")
    ax.set_ylabel(f"OOD routed accuracy per window of {xs[0]} (%)")
    ax.set_title("bench feedback: the test stream, 3 seeds pooled")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
