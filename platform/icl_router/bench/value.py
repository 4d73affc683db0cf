"""Marginal-gain estimators against the gains models really add, on real data (LLMRouter, ZeroEval).

Per dataset: the standard split (seed ``--seed``), K anchors on its train part, and a router
directory built here: a tiny LM at its random initial weights plus the anchor-evidence head
at its initial weights (kNN on the profile, softmax over cosine at tau 0.1; its LM weight
starts at 0), with the decision layer fitted on the non-anchor train rows the way the train
job fits it (``routing.decision_fit``). So the router's p the estimators read is exactly its
anchor-evidence part, and no trained LM is needed. p of every model on the ID test rows comes
from that directory's ``Scorer`` once; every pool is a subset of its columns.

Then ``--draws`` seeded random base pools per size; the candidates are the other models. A
candidate's true gain is the routed accuracy on the test rows with the real outcomes,
under the same decision rule, of base + candidate minus base's; its estimated gain comes
from the profiles alone. Under ``fitted`` each pool is routed as the service routes it
(``routing.online.OnlineRouter.sync``): the layer was fitted on every model, so any smaller
pool gets the guard's margin refitted for it on the anchors (``decision_fit.PoolDecisions``). Per dataset, base size and decision rule (``fitted``: the router
directory's decision layer, what the service runs; ``none``: the policy on p as is) one
JSON line: mean Spearman rank correlation and top-3 hit of the chosen estimator and of
the naive one, every variant's figures, and ``truth_ceiling``: about the best Spearman
any estimator can reach, as the true gains themselves are measured on a finite test set
(the square root of their split-half rank correlation, Spearman-Brown corrected).

top-3 hit: the share of the estimator's three best candidates that are among the truly
best three (ties at the third place count as best).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
DATASETS = {"llmrouter": ("routing/llmrouter", "llmrouter"), "zeroeval": ("routing/zeroeval", "zeroeval")}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (../shared/data)")
    p.add_argument("--cache-dir", default="runs/cache/evaluate", help="imported + embedded datasets (shared with evaluate)")
    p.add_argument("--datasets", default="llmrouter,zeroeval")
    p.add_argument("--sizes", default="1,3,5", help="base pool sizes")
    p.add_argument("--draws", type=int, default=20, help="random base pools per size")
    p.add_argument("--draw-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="split and anchor seed")
    p.add_argument("--k", type=int, default=500, help="anchors")
    p.add_argument("--decisions", default="fitted,none", help="fitted: the router directory's decision layer; none: the policy on p as is")
    p.add_argument("--estimator", default=None, help="the estimator reported as spearman / top3_hit (default: ValueConfig's)")
    p.add_argument("--estimators", default="eb,naive,eb-pair,eb-mix,crossfit", help="every variant measured beside it")
    p.add_argument("--noise-scale", type=float, default=None, help="eb / eb-pair noise scale (default: ValueConfig's)")
    p.add_argument("--fit-rows", type=int, default=None, help="non-anchor train rows the decision layer is fitted on (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--plot", default=None, help="write a PNG of estimated vs true gain (base size 3) here")


def say(msg: str) -> None:
    sys.stderr.write(f"[bench value {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def routing_set(args: argparse.Namespace, name: str) -> Any:
    """The dataset's routing set with the standard split of ``--seed`` and K anchors on its train part."""
    import dataclasses

    from icl_router.config import SplitConfig
    from icl_router.data.anchors import select_anchors
    from icl_router.data.routing_set import load_routing_set
    from icl_router.evaluation.run import ensure_embeddings, open_dataset, resolve

    path, fmt = DATASETS[name]
    ds = open_dataset(resolve(args.data, path), fmt, cache_dir=args.cache_dir)
    embedder = "all-MiniLM-L6-v2"
    ensure_embeddings(ds, embedder=embedder, name=embedder)
    rs = load_routing_set(ds, split=SplitConfig(name="standard", seed=args.seed), embedder=embedder, models=ds.model_ids())
    train = rs.rows("train")
    table = select_anchors(rs.labels[train], [rs.query_ids[i] for i in train], k=args.k, seed=args.seed)
    return dataclasses.replace(rs, anchor_ids=table.column("query_id").to_pylist())


def build_router(rs: Any, path: Path, *, seed: int, fit_rows: int | None) -> Any:
    """A router directory (tiny LM at init + anchor evidence at init) over every model, its
    decision layer fitted on non-anchor train rows as the train job fits it; returns its Scorer."""
    import torch

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.router_dir import RouterMeta, save_router_dir, write_decision
    from icl_router.model.tiny import build_tiny_router_lm
    from icl_router.routing.decision_fit import fit_router_decision
    from icl_router.routing.scorer import Scorer

    rng = np.random.default_rng(seed)
    sample = [rs.texts[i] for i in rng.choice(len(rs.texts), min(1000, len(rs.texts)), replace=False)]
    lm, tok = build_tiny_router_lm(sample, seed=seed)
    layout = PromptLayout(tok, query_input="vector", profile_layout="fused")
    anchor_emb = torch.tensor(rs.embeddings[rs.anchor_rows])
    router = ICLRouter(lm, layout, anchor_emb=anchor_emb, anchor_evidence=True)
    meta = RouterMeta(
        embedder=rs.embedder,
        embedding_dim=int(anchor_emb.shape[1]),
        query_input="vector",
        profile_layout="fused",
        placeholder_id=layout.placeholder_id,
        yes_id=layout.yes_id,
        no_id=layout.no_id,
        anchor_query_ids=list(rs.anchor_ids),
        anchor_evidence=True,
        extra={"built_by": "bench value: tiny LM and anchor evidence at their initial weights"},
    )
    save_router_dir(router, path, meta=meta, pool=dict(zip(rs.models, rs.profiles())))
    scorer = Scorer.from_dir(path)
    held = rs.rows("train")
    held = held[~np.isin(held, rs.anchor_rows)]
    if fit_rows is not None and fit_rows < len(held):
        held = np.sort(rng.choice(held, fit_rows, replace=False))
    params = fit_router_decision(scorer.router, texts=[""] * len(held), query_emb=rs.embeddings[held], labels=rs.labels[held], profiles=rs.profiles(), models=rs.models, seed=seed)
    write_decision(path, params.to_json())
    return Scorer.from_dir(path)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def top3(est: np.ndarray, true: np.ndarray) -> float:
    n = min(3, len(true))
    third = np.sort(true)[::-1][n - 1]
    best = set(np.flatnonzero(true >= third - 1e-12).tolist())
    return len(best & set(np.argsort(-est, kind="stable")[:n].tolist())) / n


def truth_reliability(rows_gain: np.ndarray, *, splits: int = 10) -> float:
    """Split-half Spearman of the true gains [C, n] (per-query gain of each candidate) over random halves of the rows."""
    n = rows_gain.shape[1]
    r = []
    for s in range(splits):
        h = np.random.default_rng(s).permutation(n)
        r.append(spearman(rows_gain[:, h[: n // 2]].mean(1), rows_gain[:, h[n // 2 :]].mean(1)))
    return float(np.nanmean(r)) if not np.all(np.isnan(r)) else float("nan")


def run_dataset(args: argparse.Namespace, name: str, tmp: Path, plot_points: dict) -> list[dict]:
    from icl_router.routing.decision import DecisionParams, cosine
    from icl_router.routing.decision_fit import PoolDecisions
    from icl_router.routing.marginal import Inputs, Valuer
    from icl_router.value import anchor_subset_p

    t0 = time.time()
    rs = routing_set(args, name)
    say(f"{name}: {len(rs.models)} models, K={len(rs.anchor_ids)} anchors; building the router directory")
    scorer = build_router(rs, tmp / f"router-{name}", seed=args.seed, fit_rows=args.fit_rows)
    te = rs.rows("test")
    p = scorer.score(["" for _ in te], query_emb=rs.embeddings[te], models=rs.models).astype(np.float64)
    say(f"{name}: p of {len(rs.models)} models on {len(te)} test rows in {time.time() - t0:.0f} s; decision {scorer.meta.decision}")
    labels = rs.labels[te]
    prof = rs.profiles()
    sim = cosine(rs.embeddings[te], rs.embeddings[rs.anchor_rows])
    subset = anchor_subset_p(scorer.router, p, sim, prof)
    M = len(rs.models)
    sizes = [int(s) for s in args.sizes.split(",")]
    estimators = [e.strip() for e in args.estimators.split(",")]
    chosen = args.estimator
    for must in (chosen, "naive"):
        if must not in estimators:
            estimators.append(must)
    out = []
    for decision in [d.strip() for d in args.decisions.split(",")]:
        params = DecisionParams.from_json(scorer.meta.decision) if decision == "fitted" else None
        # every pool (base, base + candidate) routed as the service routes it once registered: the
        # guard's margin refitted on the anchors for that pool, for the truth and the estimates alike
        pools = None if params is None else PoolDecisions(scorer.router, params, models=rs.models, profiles=prof)
        inputs = Inputs(rs.models, p, prof, sim, params=params, p_on_anchors=subset, decision_for=pools)
        valuers = {e: Valuer(inputs, estimator=e, noise_scale=args.noise_scale, seed=args.seed) for e in estimators}
        truth = valuers["naive"]  # every valuer picks the same way; only the scoring differs
        rows = np.arange(len(te))
        for b in sizes:
            if b >= M:
                continue
            rng = np.random.default_rng([args.draw_seed, b])
            stats: dict[str, dict[str, list[float]]] = {e: {"spearman": [], "top3_hit": []} for e in estimators}
            rel = []
            for _ in range(args.draws):
                base = sorted(rng.choice(M, b, replace=False).tolist())
                cands = [c for c in range(M) if c not in base]
                y0 = labels[rows, truth.choice(base)]
                per_row = np.stack([labels[rows, truth.choice(sorted([*base, c]))] - y0 for c in cands])  # [C, n]
                true = 100 * per_row.mean(1)
                rel.append(truth_reliability(per_row))
                for e, v in valuers.items():
                    est = np.array([v.gain(base, sorted([*base, c])) for c in cands])
                    stats[e]["spearman"].append(spearman(est, true))
                    stats[e]["top3_hit"].append(top3(est, true))
                    if b == 3 and decision == "fitted" and e in (chosen, "naive"):
                        plot_points.setdefault((name, e), []).append((true, est))
            mean = {e: {k: round(float(np.nanmean(v)), 3) for k, v in s.items()} for e, s in stats.items()}
            r = float(np.nanmean(rel))
            row = {
                "dataset": name,
                "base_size": b,
                "decision": decision,
                "estimator": chosen,
                "spearman": mean[chosen]["spearman"],
                "top3_hit": mean[chosen]["top3_hit"],
                "naive_spearman": mean["naive"]["spearman"],
                "naive_top3_hit": mean["naive"]["top3_hit"],
                "variants": mean,
                "truth_ceiling": round(float(np.sqrt(max(2 * r / (1 + r), 0.0))), 3) if np.isfinite(r) else None,
                "draws": args.draws,
                "draws_with_spearman": int(np.sum(np.isfinite(stats[chosen]["spearman"]))),
                "test_rows": int(len(te)),
                "models": M,
            }
            print(json.dumps(row), flush=True)
            out.append(row)
    say(f"{name}: done in {time.time() - t0:.0f} s")
    return out


def plot(points: dict, path: str, *, chosen: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for n, _ in points})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for e, color in ((chosen, "tab:blue"), ("naive", "tab:orange")):
            pts = points.get((name, e), [])
            if not pts:
                continue
            t = np.concatenate([a for a, _ in pts])
            s = np.concatenate([b for _, b in pts])
            ax.scatter(t, s, s=10, alpha=0.5, color=color, label=f"{e}: estimated")
        lim = ax.get_xlim()
        ax.plot(lim, lim, color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("true marginal gain (points, test rows)")
        ax.set_ylabel("estimated marginal gain (points, from profiles)")
        ax.set_title(f"{name}: base pools of 3, the service's decision layer")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from icl_router.config import ValueConfig

    t0 = time.time()
    args.estimator = args.estimator or ValueConfig.model_fields["estimator"].default
    if args.noise_scale is None:
        args.noise_scale = ValueConfig.model_fields["noise_scale"].default
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    points: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-value-") as tmp:
        for name in [d.strip() for d in args.datasets.split(",")]:
            if name not in DATASETS:
                raise SystemExit(f"--datasets: {name!r} is unknown; use {', '.join(DATASETS)}")
            rows += run_dataset(args, name, Path(tmp), points)
    if args.plot:
        plot(points, args.plot, chosen=args.estimator)
    target = {"base_size": 3, "spearman": 0.7, "top3_hit": 0.8}
    met = {
        f"{r['dataset']}/{r['decision']}": r["spearman"] >= target["spearman"] and r["top3_hit"] >= target["top3_hit"]
        for r in rows
        if r["base_size"] == target["base_size"]
    }
    return {
        "estimator": args.estimator,
        "noise_scale": args.noise_scale,
        "target": target,
        "target_met": met,
        "summary": {f"{r['dataset']}/{r['decision']}/{r['base_size']}": [r["spearman"], r["top3_hit"], r["naive_spearman"], r["naive_top3_hit"]] for r in rows},
        "summary_keys": ["spearman", "top3_hit", "naive_spearman", "naive_top3_hit"],
        "seconds": round(time.time() - t0, 1),
    }
