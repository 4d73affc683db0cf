"""``icl-router value``: which candidate models should join a pool, and which pool models could leave.

From profiles alone, before any candidate is served: the router's p(correct) of every model
(pool and candidates, each registered by its profile, no retraining) on a set of evaluation
queries, then the estimators of ``routing.marginal`` under the router directory's decision
layer and the configured policy (what the service would route). Writes ``value.json``
(``candidates`` and ``removals``: ``{"model", "gain", "traffic_share", "cost_change"}``,
best gain first), a ranked ``value.md`` and ``value.png`` (gain against cost per candidate;
the greedy best pool of each size).

Every input is checked before anything is written: the router directory, the pool, the
evaluation set's embeddings (from the router's embedder), each candidate's profile (given,
registered, measured in ``dataset``, or to be measured: then its anchors must be gradable),
and the costs the policy needs. Only then are missing profiles measured with the profile
job (vLLM on Ray Data, missing pairs only, appended to ``dataset``'s outcomes).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from icl_router import schemas
from icl_router.config import ConfigError, ProfileConfig, ValueConfig
from icl_router.data.dataset import Dataset, DatasetError, correctness_matrix
from icl_router.data.splits import make_split
from icl_router.model.router_dir import PROFILES_FILE, RouterMeta, read_meta, read_profiles
from icl_router.routing.decision import DecisionParams, cosine
from icl_router.routing.marginal import Inputs, Valuer, candidate_gains, evidence_logit, greedy_pools, removal_gains
from icl_router.routing.policy import Policy


def say(msg: str) -> None:
    sys.stderr.write(f"[value {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Checking the inputs (nothing written yet)


def resolve_pool(cfg: ValueConfig, registered: dict[str, np.ndarray], router: Path) -> list[str]:
    if not registered:
        raise ConfigError(f"router {router} has no registered models (profiles.parquet is empty); register a pool with `icl-router register`")
    if cfg.pool is None:
        return list(registered)
    unknown = [m for m in cfg.pool if m not in registered]
    if unknown:
        raise ConfigError(f"pool: {unknown} are not registered in {router}; registered: {list(registered)}")
    return list(cfg.pool)


def eval_queries(cfg: ValueConfig, meta: RouterMeta) -> tuple[Dataset, list[str], list[str], np.ndarray]:
    """(dataset, query ids, texts, embeddings [Q, E] from the router's embedder) of the evaluation set."""
    e = cfg.evaluation
    path = e.dataset or cfg.dataset
    if path is None:
        raise ConfigError("evaluation.dataset (or dataset) must name the dataset holding the evaluation queries")
    ds = Dataset(path)
    q = ds.read_queries()
    ids = q.column(schemas.QUERY_ID).to_pylist()
    texts = dict(zip(ids, q.column(schemas.TEXT).to_pylist()))
    if e.split is not None:
        try:
            ids = make_split(q, e.split).part(e.part)
        except ValueError as err:
            raise ConfigError(f"evaluation.split: {err}") from None
    anchors = set(meta.anchor_query_ids)
    ids = [i for i in ids if i not in anchors]  # an anchor's own outcome is in every profile
    if e.max_queries is not None and len(ids) > e.max_queries:
        keep = np.sort(np.random.default_rng(e.seed).choice(len(ids), e.max_queries, replace=False))
        ids = [ids[i] for i in keep]
    if not ids:
        raise ConfigError(f"evaluation: no query of {ds.root} is left (split {e.split and e.split.name!r}, part {e.part!r}, anchors excluded)")
    name = meta.embedder_name  # model@variant: the embed job records which form of the embedder wrote each vector
    field = "evaluation.dataset" if e.dataset else "dataset (the evaluation set)"
    fix = f"embed them first: icl-router embed --config jobs/embed/config.yaml dataset={ds.root} embedder={name}"
    table = ds.read_embeddings()
    mine = table.filter(pc.equal(table.column(schemas.EMBEDDER), name))
    have = set(mine.column(schemas.QUERY_ID).to_pylist())
    missing = [i for i in ids if i not in have]
    if missing:
        others = sorted(set(table.column(schemas.EMBEDDER).to_pylist()) - {name})
        found = f"it holds embeddings from {others} only" if others and not have else "it holds no embeddings" if not have else f"{len(have)} queries have one"
        raise DatasetError(
            f"{field} {ds.root}: {len(missing)} of its {len(ids)} evaluation queries have no embedding from the router's embedder "
            f"{name!r} (e.g. {missing[:3]}; {found}); the router reads queries as that model's vectors: {fix}"
        )
    emb = ds.embedding_matrix(ids, embedder=name)
    if emb.shape[1] != meta.embedding_dim:
        raise DatasetError(f"{field} {ds.root}: its {name!r} embeddings are {emb.shape[1]}-d, the router reads {meta.embedding_dim}-d: {fix}")
    return ds, ids, [texts[i] for i in ids], emb


def candidate_profiles(cfg: ValueConfig, registered: dict[str, np.ndarray], meta: RouterMeta, router: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """({candidate: bool [K]} known now, candidates to profile first); every other case is an error."""
    anchor_ids = meta.anchor_query_ids
    K = len(anchor_ids)
    ds = Dataset(cfg.dataset) if cfg.dataset else None
    measured = None
    if ds is not None:
        names = [c.name for c in cfg.candidates if c.profile is None and c.name not in registered]
        measured = correctness_matrix(ds.read_outcomes(names), anchor_ids, names) if names else None  # [K, n], NaN: no outcome
    known: dict[str, np.ndarray] = {}
    todo: list[str] = []
    for i, c in enumerate(cfg.candidates):
        if c.profile is not None:
            if len(c.profile) != K:
                raise ConfigError(
                    f"candidates[{i}] ({c.name!r}).profile has {len(c.profile)} outcomes; the router has K={K} anchors "
                    f"(anchor_query_ids of {router / 'icl_router.json'}): give one outcome per anchor, in that order"
                )
            known[c.name] = np.asarray(c.profile, dtype=bool)
            continue
        if c.name in registered:
            known[c.name] = registered[c.name]
            continue
        n_have = 0
        if measured is not None:
            col = measured[:, names.index(c.name)]
            n_have = int((~np.isnan(col)).sum())
            if n_have == K:
                known[c.name] = col >= schemas.CORRECT_THRESHOLD
                continue
        if c.serving is not None:
            if ds is None:
                raise ConfigError(f"candidates[{i}] ({c.name!r}) is to be profiled: set dataset (the dataset holding the router's anchor queries; outcomes are appended there)")
            todo.append(c.name)
            continue
        where = f"dataset {ds.root} has its outcomes on {n_have} of the router's {K} anchors" if ds is not None else "no dataset is set"
        raise ConfigError(
            f"candidates[{i}] ({c.name!r}) has no profile and no serving path: no `profile` given, not registered in {router}, and {where}. "
            f"Give candidates[{i}].serving (e.g. {{path: /models/{c.name}}}) to profile it first with vLLM, or its `profile`"
        )
    return known, todo


def check_gradable(cfg: ValueConfig, anchor_ids: list[str], todo: list[str]) -> ProfileConfig:
    """The profile job's config for the candidates ``todo``; raises unless every anchor can be run and graded."""
    from icl_router.data.profile import select_queries

    models = [c.serving for c in cfg.candidates if c.name in todo]
    pcfg = ProfileConfig(dataset=cfg.dataset, models=models, batch_size=cfg.batch_size, shard_size=cfg.shard_size, ray=cfg.ray)
    try:
        select_queries(Dataset(cfg.dataset), pcfg, query_ids=anchor_ids)
    except DatasetError as e:
        raise DatasetError(f"cannot profile {todo} on the router's anchors: {e}") from None
    return pcfg


def model_costs(cfg: ValueConfig, models: list[str], policy: Policy) -> np.ndarray | None:
    """Dollars per query [T]: the config's, else the mean ``cost`` of the model's outcomes in ``dataset``."""
    found = {m: float(cfg.costs[m]) for m in models if m in cfg.costs}
    rest = [m for m in models if m not in found]
    if rest and cfg.dataset:
        out = Dataset(cfg.dataset).read_outcomes(rest)
        cost = out.column(schemas.COST).to_numpy(zero_copy_only=False).astype(np.float64)
        who = np.array(out.column(schemas.MODEL_ID).to_pylist(), dtype=object)
        for m in rest:
            c = cost[(who == m) & ~np.isnan(cost)]
            if len(c):
                found[m] = float(c.mean())
    missing = [m for m in models if m not in found]
    if missing and policy.needs_costs:
        raise ConfigError(f"policy {policy.kind!r} needs a cost per model; {missing} have none: set costs.<model> (dollars per query)")
    return None if missing else np.array([found[m] for m in models])


def make_policy(cfg: ValueConfig) -> Policy:
    return cfg.policy.build()  # checked when the config loaded


# ---------------------------------------------------------------------------
# p for every model


def score_all(cfg: ValueConfig, profiles: dict[str, np.ndarray], registered: dict[str, np.ndarray], texts: list[str], emb: np.ndarray) -> tuple[np.ndarray, Any]:
    """The router's p [Q, T] of every model in ``profiles`` (added by profile, no retraining), and the router."""
    from icl_router.routing.scorer import Scorer

    scorer = Scorer.from_dir(cfg.router)
    for m, prof in profiles.items():
        if m not in registered or not np.array_equal(registered[m], prof):
            scorer.add(m, prof)
    models = list(profiles)
    chunk = 256
    out = []
    for lo in range(0, len(texts), chunk):
        out.append(scorer.score(texts[lo : lo + chunk], query_emb=emb[lo : lo + chunk], models=models))
        say(f"scored {min(lo + chunk, len(texts))}/{len(texts)} queries x {len(models)} models")
    return np.concatenate(out).astype(np.float64), scorer.router


def anchor_subset_p(router: Any, p: np.ndarray, sim: np.ndarray, profiles: np.ndarray) -> Any:
    """For crossfit: the router's p with its anchor-evidence logit recomputed on anchors ``keep`` (the LM's part held)."""
    if router.evidence is None:
        return None
    ev = router.evidence
    weight = ev.weight.detach().double().numpy()
    bias = float(ev.bias.detach().double().numpy()[0])
    taus = ev.taus.double().numpy().tolist()
    base = np.log(np.clip(p, 1e-7, 1 - 1e-7)) - np.log1p(-np.clip(p, 1e-7, 1 - 1e-7)) - evidence_logit(sim, profiles, weight, bias, taus)

    def on(keep: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(base + evidence_logit(sim, profiles, weight, bias, taus, keep=keep))))

    return on


# ---------------------------------------------------------------------------
# Outputs


def _write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _money(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3g}"


def render_md(result: dict) -> str:
    lines = [
        "# Candidate models: estimated marginal routed gain",
        "",
        f"Router `{result['router']}`, pool {', '.join(f'`{m}`' for m in result['pool'])} "
        f"(estimated routed accuracy {result['pool_accuracy']:.1f}%), {result['queries']} evaluation queries, "
        f"estimator `{result['estimator']}`, policy `{result['policy']['kind']}`"
        + (", the router's decision layer" if result["decision"] else ", no decision layer")
        + ". Gains are in accuracy points, estimated from the profiles alone (no candidate was served).",
        "",
        "## Candidates, best first",
        "",
        "| rank | model | gain (points) | traffic share | cost change ($/query) |",
        "|---:|---|---:|---:|---:|",
    ]
    for i, r in enumerate(result["candidates"], 1):
        lines.append(f"| {i} | `{r['model']}` | {r['gain']:+.2f} | {_pct(r['traffic_share'])} | {_money(r['cost_change'])} |")
    lines += [
        "",
        "## Removing a pool model (least loss first)",
        "",
        "| model | gain (points) | its traffic share now | cost change ($/query) |",
        "|---|---:|---:|---:|",
    ]
    for r in result["removals"]:
        lines.append(f"| `{r['model']}` | {r['gain']:+.2f} | {_pct(r['traffic_share'])} | {_money(r['cost_change'])} |")
    lines += ["", "## Greedy best pool of each size", "", "| size | added | estimated accuracy | cost ($/query) |", "|---:|---|---:|---:|"]
    prev: list[str] = []
    for g in result["greedy"]:
        added = [m for m in g["models"] if m not in prev]
        prev = g["models"]
        cost = "—" if g["cost"] is None else f"{g['cost']:.3g}"
        lines.append(f"| {g['size']} | `{added[0]}` | {g['accuracy']:.1f}% | {cost} |")
    return "\n".join(lines) + "\n"


def render_png(result: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    cands = result["candidates"]
    with_cost = bool(cands) and all(r["cost_change"] is not None for r in cands)
    xs = [r["cost_change"] if with_cost else 100 * r["traffic_share"] for r in cands]
    ys = [r["gain"] for r in cands]
    a.scatter(xs, ys, color="tab:blue")
    for i, (x, y, r) in enumerate(zip(xs, ys, cands)):  # offsets alternate so labels of near points stay apart
        a.annotate(r["model"], (x, y), fontsize=7, xytext=(4, 4 - 10 * (i % 3)), textcoords="offset points")
    a.axhline(0, color="grey", lw=0.8)
    a.set_xlabel("cost change ($/query)" if with_cost else "traffic share (%) (no costs given)")
    a.set_ylabel("estimated gain (accuracy points)")
    a.set_title(f"Candidates added to the pool ({result['estimator']} estimator)")
    sizes = [g["size"] for g in result["greedy"]]
    acc = [g["accuracy"] for g in result["greedy"]]
    b.plot(sizes, acc, marker="o", color="tab:green", label="greedy best pool")
    b.scatter([len(result["pool"])], [result["pool_accuracy"]], color="tab:red", zorder=3, label="current pool")
    added, prev = [], set()
    for g in result["greedy"]:
        added.append(sorted(set(g["models"]) - prev)[0])
        prev = set(g["models"])
    b.set_xticks(sizes, [f"{s}: + {m}" for s, m in zip(sizes, added)], rotation=35, ha="right", fontsize=7)
    b.set_xlabel("pool size: the model added")
    b.set_ylabel("estimated routed accuracy (%)")
    b.set_title("Greedy best pool of each size")
    b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------


def run_value(cfg: ValueConfig) -> dict[str, Any]:
    t0 = time.time()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    router = Path(cfg.router)
    meta = read_meta(router)
    anchor_ids = meta.anchor_query_ids
    registered = read_profiles(router / PROFILES_FILE, anchor_ids)
    pool = resolve_pool(cfg, registered, router)
    policy = make_policy(cfg)
    ds_eval, ids, texts, emb = eval_queries(cfg, meta)
    known, todo = candidate_profiles(cfg, registered, meta, router)
    pcfg = check_gradable(cfg, anchor_ids, todo) if todo else None
    names = [c.name for c in cfg.candidates]
    models = [*pool, *names]
    costs = model_costs(cfg, models, policy)
    say(f"pool {pool}; {len(names)} candidates ({len(todo)} to profile); {len(ids)} evaluation queries of {ds_eval.root}")

    if pcfg is not None:  # every input checked: only now is anything run or written
        from icl_router.data.profile import run_profile
        from icl_router.routing.register import anchor_profiles

        say(f"profiling {todo} on the router's {len(anchor_ids)} anchors (missing pairs only)")
        run_profile(pcfg, query_ids=anchor_ids)
        known.update(anchor_profiles(Dataset(cfg.dataset), todo, anchor_ids))

    profiles = {m: registered[m] for m in pool} | {m: known[m] for m in names}
    p, rt = score_all(cfg, profiles, registered, texts, emb)
    prof = np.stack([profiles[m] for m in models])  # [T, K]
    sim = cosine(emb, rt.anchor_emb.detach().float().numpy())
    params = DecisionParams.from_json(meta.decision) if meta.decision is not None else None
    from icl_router.routing.decision_fit import PoolDecisions

    # each pool valued (pool, pool + candidate, pool - model, the greedy pools) is routed as the service
    # would after registering or removing: the guard's margin refitted for it unless it is the fitted pool
    pools = None if params is None else PoolDecisions(rt, params, models=models, profiles=prof)
    inputs = Inputs(models, p, prof, sim, params=params, policy=policy, costs=costs, p_on_anchors=anchor_subset_p(rt, p, sim, prof), decision_for=pools)
    valuer = Valuer(inputs, estimator=cfg.estimator, noise_scale=cfg.noise_scale, folds=cfg.folds, repeats=cfg.repeats, seed=cfg.evaluation.seed)
    pool_cols = list(range(len(pool)))
    cand_cols = list(range(len(pool), len(models)))
    result = {
        "router": str(router),
        "pool": pool,
        "pool_accuracy": round(valuer.accuracy(pool_cols), 3),
        "pool_cost": valuer.cost(pool_cols),
        "candidates": candidate_gains(valuer, pool_cols, cand_cols),
        "removals": removal_gains(valuer, pool_cols),
        "greedy": greedy_pools(valuer, list(range(len(models))), max_size=cfg.greedy_max),
        "estimator": cfg.estimator,
        "policy": cfg.policy.model_dump(),
        "decision": None if params is None else params.to_json(),
        "pool_min_gain": None if params is None else valuer.params_for(pool_cols).min_gain,
        "queries": len(ids),
        "evaluation_dataset": str(ds_eval.root),
        "embedder": meta.embedder_name,
        "profiled": todo,
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "value.json", json.dumps(result, indent=1))
    _write(out / "value.md", render_md(result))
    _write(out / "value.png", render_png(result))
    say(f"wrote {out}/value.json, value.md, value.png in {result['seconds']:.0f} s")
    best = result["candidates"][0] if result["candidates"] else None
    return {"output": str(out), "pool_accuracy": result["pool_accuracy"], "best_candidate": best, "profiled": todo, "seconds": result["seconds"]}
