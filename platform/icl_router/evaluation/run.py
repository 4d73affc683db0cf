"""``icl-router evaluate``: the standard protocol on every dataset, beside every baseline.

Per dataset and seed: the seed's split, K anchors on its train part, the baselines
(random, best single, max expert, kNN, the tuned neighbour rule, logistic regression,
oracle) and the ICL-Router variants (trained in-process with the Ray Train job's steps,
or loaded from given router directories) with their decision layer fitted on held-out
train queries, all on the same rows. On the first dataset and seed also: the add-model
experiment, accuracy vs K and vs pool size. Then the RouterBench cost section.
Writes ``report.json``, ``report.md`` and PNG plots to the output directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_router import schemas
from icl_router.config import (
    ConfigError,
    EvalDatasetConfig,
    EvalRouterConfig,
    EvaluateConfig,
    SplitConfig,
    TrainStepsConfig,
)
from icl_router.data.dataset import Dataset, DatasetError
from icl_router.data.routing_set import RoutingSet, load_routing_set
from icl_router.evaluation import baselines
from icl_router.evaluation.fit import fit as fit_in_process
from icl_router.evaluation.fit import for_seed, score, tiny_init
from icl_router.routing.decision import DecisionParams, cosine, layer_input, routed_accuracy
from icl_router.routing.decision_fit import refit_guard
from icl_router.routing.policy import Policy, route_batch
from icl_router.train.data import build_train_data
from icl_router.train.held_out import fit_decision_on_held_out, fold_trainer, rows_trained

# icl-router: the router with its decision layer, queries naming their task; -no-task: the same without
# the task; -evidence: its evidence head alone (the serving fast path) with the same decision layer;
# -raw: the router's argmax without the decision layer
METHODS = [
    "icl-router", "icl-router-no-task", "icl-router-evidence", "icl-router-raw", "icl-router-text",
    "random", "best-single", "max-expert", "knn", "knn-tuned", "knn-tuned-task", "logreg", "oracle",
]


def say(msg: str) -> None:
    sys.stderr.write(f"[evaluate {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Data: import and embed when needed


def resolve(data_root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(data_root) / p


def open_dataset(path: Path, fmt: str | None, *, cache_dir: str) -> Dataset:
    """An imported dataset directory, or JSONL of ``fmt`` imported once into ``cache_dir``."""
    if not path.exists():
        raise ConfigError(f"dataset {path} does not exist; set dataset= (relative to data_root) or data_root=PATH")
    if fmt is None:
        if not (path / "queries.parquet").is_file():
            raise ConfigError(f"dataset {path} is not an imported dataset directory (no queries.parquet); set format= to import it")
        return Dataset(path)
    files = sorted(path.rglob("*.json*")) if path.is_dir() else [path]
    key = hashlib.sha1(json.dumps([fmt, *[(str(f.resolve()), f.stat().st_size, f.stat().st_mtime) for f in files]]).encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{fmt}-{path.name}-{key}"
    if not (target / "queries.parquet").is_file():
        from icl_router.data.importers import import_dataset

        say(f"importing {path} ({fmt}) into {target}")
        import_dataset(fmt, [str(path)], target, overwrite=True, on_missing_label="skip")
    return Dataset(target)


def last_block(text: str) -> str:
    """The query of a few-shot prompt: its last blank-line-separated block (RouterBench)."""
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    return blocks[-1] if blocks else text


def ensure_embeddings(ds: Dataset, *, embedder: str, name: str, view: Any = None) -> None:
    """Embed (in-process sentence-transformers) the queries with no ``name`` embedding yet."""
    import pyarrow as pa

    q = ds.read_queries()
    done = set(ds.read_embeddings(name).column(schemas.QUERY_ID).to_pylist())
    todo = [(i, t) for i, t in zip(q.column(schemas.QUERY_ID).to_pylist(), q.column(schemas.TEXT).to_pylist()) if i not in done]
    if not todo:
        return
    from icl_router.data.embedder import BUNDLED, load_embedder

    if embedder == BUNDLED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model must never reach for the hub
    say(f"embedding {len(todo)} queries of {ds.root} with {embedder} (in-process)")
    model = load_embedder(embedder)
    texts = [view(t) if view else t for _, t in todo]
    emb = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    ds.append_embeddings(
        pa.table(
            {
                schemas.QUERY_ID: [i for i, _ in todo],
                schemas.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
                schemas.EMBEDDER: [name] * len(todo),
            }
        )
    )


def dense(ds: Dataset, *, embedder: str, split: SplitConfig) -> tuple[RoutingSet, Any]:
    """(RoutingSet without anchors: each seed picks its own, the queries table) of a dataset."""
    models = ds.model_ids()
    if len(models) < 2:
        raise DatasetError(f"{ds.root} has {len(models)} models with outcomes; routing needs at least 2")
    rs = load_routing_set(ds, split=split, embedder=embedder, models=models)
    rs.anchor_ids = []
    return rs, ds.read_queries()


def open_entry(cfg: EvaluateConfig, d: EvalDatasetConfig) -> tuple[Dataset, str]:
    """(the dataset of one entry, imported / generated and embedded, the name of its embeddings)."""
    if d.generate is not None:
        from icl_router.data.generate import generate_dataset

        key = hashlib.sha1(json.dumps(d.generate.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
        target = Path(cfg.cache_dir) / f"synthetic-{key}"
        if not (target / "queries.parquet").is_file():
            say(f"generating the synthetic pool {d.name} into {target}")
            generate_dataset(target, d.generate, overwrite=True)
        ds = Dataset(target)
    else:
        ds = open_dataset(resolve(cfg.data_root, d.dataset), d.format, cache_dir=cfg.cache_dir)
    name = cfg.embedder if d.view == "text" else f"{cfg.embedder}+last-block"
    ensure_embeddings(ds, embedder=cfg.embedder, name=name, view=last_block if d.view == "last-block" else None)
    return ds, name


# ---------------------------------------------------------------------------
# Routers


HIGHEST = Policy()


@dataclass
class Routed:
    """A trained router ready for one seed's rows: the pool's columns, profiles and priors, its decision layer."""

    router: Any
    info: dict
    cols: list[int]  # T columns of the routing set: the pool
    profiles: np.ndarray  # bool [T, K]
    decision: DecisionParams | None

    @property
    def prior(self) -> np.ndarray:
        return self.profiles.mean(axis=1)  # [T] accuracy on the anchors


def train_config(rc: EvalRouterConfig, *, seed: int, max_steps: int | None = None) -> TrainStepsConfig:
    """The in-process training's steps; under the device rule it trains on cuda (bfloat16) where this process sees a GPU."""
    from icl_router.config import ScalingConfig
    from icl_router.model.device import resolve_device

    gpu = resolve_device(rc.router.device, where="icl_router.router.device").type == "cuda"
    return TrainStepsConfig(
        scaling=ScalingConfig(num_workers=1, use_gpu=gpu),
        stage=2,
        router=rc.router,
        phases=rc.phases,
        batch_size=rc.batch_size,
        max_steps=max_steps or rc.max_steps,
        max_text_tokens=rc.max_text_tokens,
        seed=seed,
    )


def get_router(rc: EvalRouterConfig, rs: RoutingSet, *, seed: int, seed_i: int, cache: Path, label: str, models: list[int] | None = None, max_steps: int | None = None) -> Routed:
    """A trained router for this seed's routing set (trained here, or the given checkpoint) with its decision layer."""
    cols = list(range(len(rs.models))) if models is None else list(models)
    profiles = rs.profiles([rs.models[m] for m in cols])
    val = np.zeros(0, dtype=np.int64)
    stored = None
    if rc.checkpoints is not None and models is None:
        from icl_router.model.device import resolve
        from icl_router.model.router_dir import load_router_dir

        device, dtype = resolve(rc.router.device, rc.router.dtype, where="icl_router.router")
        loaded = load_router_dir(rc.checkpoints[seed_i], device=device, dtype=dtype)
        if loaded.meta.anchor_query_ids != rs.anchor_ids:
            raise ConfigError(
                f"checkpoint {rc.checkpoints[seed_i]} was trained with other anchors than seed {seed}'s; "
                f"train it on this split with k={rc.k} and seed {seed}"
            )
        router, info = loaded.router.eval(), {"checkpoint": rc.checkpoints[seed_i], "kept_step": checkpoint_kept_step(loaded.meta.extra)}
        stored = None if loaded.meta.decision is None or rc.refit_decision else DecisionParams.from_json(loaded.meta.decision)
        if rc.decision is not None and stored is None and info["kept_step"]:
            raise ConfigError(
                f"checkpoint {rc.checkpoints[seed_i]} kept trained step {info['kept_step']} and its decision layer is to be fitted here, "
                "but the queries it trained on are unknown to evaluate; fit it with the train job (decision:), or set icl_router.decision=null"
            )
    else:
        cfg = train_config(rc, seed=seed, max_steps=max_steps)
        data, val = build_train_data(rs, stage=2, val_fraction=rc.val_fraction, seed=seed, models=models)
        init = tiny_init(cfg, rs.texts, cache) if cfg.router.name_or_path is None else cfg.router.name_or_path
        router, info = fit_in_process(cfg, data, init_dir=init, rs=rs, val=val if len(val) else None, eval_every=rc.eval_every, label=label)
    decision = stored
    if rc.decision is not None and stored is None:
        kept_step = info.get("kept_step", info.get("steps", 0))  # no validation: the last step is kept
        fitted = fit_decision_on_held_out(
            router, rs, cols=cols, decision=rc.decision, max_text_tokens=rc.max_text_tokens, seed=seed,
            trained_on=rows_trained(cfg, data, steps=kept_step) if kept_step else None,
            fold_router=fold_trainer(cfg, data, steps=kept_step, init_dir=init, device=next(router.parameters()).device) if kept_step else None,
        )
        decision = fitted.params
        info.update(fitted.summary())
    return Routed(router, info, cols, profiles, decision)


def checkpoint_kept_step(extra: dict) -> int:
    """The step a router directory's weights are from, by its provenance (``RouterMeta.extra``): 0 when the
    train job's keep-check kept the untrained router, else the steps it trained (0 when it records none)."""
    return 0 if extra.get("kept") == "untrained" else int(extra.get("steps", 0))


def raw_p(r: Routed, rs: RoutingSet, rows: np.ndarray, rc: EvalRouterConfig) -> np.ndarray:
    """The router's p [len(rows), T] before the decision layer."""
    return score(r.router, rs, rows, r.profiles, max_text_tokens=rc.max_text_tokens)


def evidence_p(r: Routed, rs: RoutingSet, rows: np.ndarray) -> np.ndarray:
    """p [len(rows), T] of the router's anchor-evidence head alone: the serving path that skips the LM."""
    from icl_router.routing.fast import EvidenceScorer

    fast = EvidenceScorer.from_router(r.router, {f"m{t}": prof for t, prof in enumerate(r.profiles)})
    return fast.score(query_emb=rs.embeddings[rows])


def task_names(rs: RoutingSet, rows: np.ndarray) -> list[str]:
    return [rs.tasks[i] for i in rows]


def decide(
    r: Routed, rs: RoutingSet, rows: np.ndarray, p: np.ndarray, *, policy: Policy = HIGHEST, costs: np.ndarray | None = None, tasks: bool = True
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(chosen column [n], the p it decided on [n, T], the guard's default) through the decision layer;
    ``tasks``: the queries name their task (the task layer routes those whose task has anchors)."""
    names = [rs.models[m] for m in r.cols]
    if r.decision is None:
        return route_batch(p, policy=policy, models=names, costs=costs)
    sim = cosine(rs.embeddings[rows], r.router.anchor_emb.detach().float().cpu().numpy())  # [n, K]
    li = layer_input(p, sim, params=r.decision, profiles=r.profiles, query_tasks=task_names(rs, rows) if tasks else None,
                     anchor_tasks=task_names(rs, rs.anchor_rows))
    return route_batch(li.p, policy=policy, models=names, costs=costs, prior=r.prior, mass=li.mass, params=r.decision, task_rows=li.task_rows)


def score_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """The routed accuracy of a score matrix [n, M]: each query to its argmax (ties: the first model)."""
    return routed_accuracy(np.asarray(scores).argmax(axis=1), labels)


# ---------------------------------------------------------------------------
# The sections


def baseline_scores(rs: RoutingSet, *, knn_k: int, seed: int) -> dict[str, dict[str, float]]:
    """{method: {"id": acc, "ood": acc}} of the baselines on this seed's ID test and OOD rows."""
    tr = rs.rows("train")
    parts = {k: rs.rows(p) for k, p in (("id", "test"), ("ood", "ood")) if len(rs.rows(p))}
    every = np.concatenate(list(parts.values()))
    lr = baselines.logreg(rs.embeddings[tr], rs.labels[tr], rs.embeddings[every])  # one fit for both parts
    tuned, _ = baselines.knn_tuned(rs.embeddings[tr], rs.labels[tr], rs.embeddings[every], seed=seed)
    tuned_task, _ = baselines.knn_tuned(rs.embeddings[tr], rs.labels[tr], rs.embeddings[every], tasks=(task_names(rs, tr), task_names(rs, every)), seed=seed)
    out: dict[str, dict[str, float]] = {}
    start = 0
    for key, rows in parts.items():
        lab = rs.labels[rows]
        tasks = [rs.tasks[i] for i in rows]
        res = {
            "random": baselines.random_expected(lab),
            "best-single": score_accuracy(baselines.best_single(rs.labels[tr], len(rows)), lab),
            # OOD tasks have no train queries: their best model is picked on test
            "max-expert": score_accuracy(baselines.max_expert(rs.labels[tr], [rs.tasks[i] for i in tr], tasks, test_labels=lab), lab),
            "knn": score_accuracy(baselines.knn(rs.embeddings[tr], rs.labels[tr], rs.embeddings[rows], k=knn_k), lab),
            "knn-tuned": score_accuracy(tuned[start : start + len(rows)], lab),
            "knn-tuned-task": score_accuracy(tuned_task[start : start + len(rows)], lab),
            "logreg": score_accuracy(lr[start : start + len(rows)], lab),
            "oracle": score_accuracy(baselines.oracle(lab), lab),
        }
        start += len(rows)
        for m, v in res.items():
            out.setdefault(m, {})[key] = v
    return out


def auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC by ranks (ties averaged); None if one class is absent."""
    from scipy.stats import rankdata

    y = y.astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return None
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def add_model_section(cfg: EvaluateConfig, rs: RoutingSet, full: Routed, *, seed: int, cache: Path) -> list[dict]:
    """Per model: trained without it, added by its profile only vs the router trained with it (ID test).

    The added model joins with its profile: its prior is its profile accuracy, the guard's default
    follows the profiles and its margin is refitted on the anchors (``decision_fit.refit_guard``);
    the rest of the decision layer is what was fitted without it."""
    te = rs.rows("test")
    lab = rs.labels[te]
    rc = cfg.icl_router
    full_p = raw_p(full, rs, te, rc)
    full_choice, _, _ = decide(full, rs, te, full_p)
    out = []
    for j, name in enumerate(rs.models):
        others = [m for m in range(len(rs.models)) if m != j]
        without = get_router(rc, rs, seed=seed, seed_i=0, cache=cache, label=f"add-model -{name}", models=others, max_steps=cfg.sweep_max_steps)
        guard = None if without.decision is None else refit_guard(without.router, without.decision, profiles=rs.profiles(), models=rs.models,
                                                                   anchor_tasks=task_names(rs, rs.anchor_rows), seed=seed)
        added = Routed(without.router, without.info, list(range(len(rs.models))), rs.profiles(), guard)
        p = raw_p(added, rs, te, rc)  # all models; j's profile was never trained on
        choice, _, _ = decide(added, rs, te, p)
        choice_wo, _, _ = decide(without, rs, te, p[:, others])
        known = ~np.isnan(lab[:, j])
        out.append(
            {
                "model": name,
                "acc_added": routed_accuracy(choice, lab),
                "acc_trained": routed_accuracy(full_choice, lab),
                "acc_without": routed_accuracy(choice_wo, lab[:, others]),
                "auc_added": auc(p[known, j], lab[known, j] >= 0.5),
                "auc_trained": auc(full_p[known, j], lab[known, j] >= 0.5),
                "share_added": float(100 * np.mean(choice == j)),
                "share_trained": float(100 * np.mean(full_choice == j)),
            }
        )
        say(f"add-model {name}: added {out[-1]['acc_added']:.1f} trained-with {out[-1]['acc_trained']:.1f} without {out[-1]['acc_without']:.1f}")
    return out


def k_section(cfg: EvaluateConfig, d: EvalDatasetConfig, rs0: RoutingSet, queries: Any, *, seed: int, cache: Path) -> list[dict]:
    out = []
    for k in cfg.k_sweep:
        rc = cfg.icl_router.model_copy(update={"k": k, "checkpoints": None})
        try:
            rs = for_seed(rs0, queries, d.split, seed=seed, k=k)
        except ConfigError as e:  # more anchors than informative train queries
            say(f"K={k}: skipped ({e})")
            continue
        r = get_router(rc, rs, seed=seed, seed_i=0, cache=cache, label=f"K={k}", max_steps=cfg.sweep_max_steps)
        row = {"k": k, "steps": r.info.get("steps")}
        for part, key in (("test", "id"), ("ood", "ood")):
            rows = rs.rows(part)
            if len(rows):
                row[key] = routed_accuracy(decide(r, rs, rows, raw_p(r, rs, rows, rc))[0], rs.labels[rows])
        say(f"K={k}: " + " ".join(f"{key.upper()} {row[key]:.1f}" for key in ("id", "ood") if key in row))
        out.append(row)
    return out


def pool_section(cfg: EvaluateConfig, rs: RoutingSet, *, seed: int, cache: Path) -> list[dict]:
    """The n best models on train (by train accuracy) as the pool: router vs kNN vs best single vs oracle."""
    tr, te = rs.rows("train"), rs.rows("test")
    order = list(np.argsort(-np.nanmean(rs.labels[tr], axis=0), kind="stable"))
    out = []
    for n in cfg.pool_sizes:
        if n >= len(rs.models) or n < 2:
            continue
        pool = sorted(order[:n])
        r = get_router(cfg.icl_router, rs, seed=seed, seed_i=0, cache=cache, label=f"pool {n}", models=pool, max_steps=cfg.sweep_max_steps)
        lab = rs.labels[te][:, pool]
        tuned, _ = baselines.knn_tuned(rs.embeddings[tr], rs.labels[tr][:, pool], rs.embeddings[te], seed=seed)
        row = {
            "n": n,
            "models": [rs.models[m] for m in pool],
            "icl-router": routed_accuracy(decide(r, rs, te, raw_p(r, rs, te, cfg.icl_router))[0], lab),
            "knn": score_accuracy(baselines.knn(rs.embeddings[tr], rs.labels[tr][:, pool], rs.embeddings[te], k=cfg.knn_k), lab),
            "knn-tuned": score_accuracy(tuned, lab),
            "best-single": score_accuracy(baselines.best_single(rs.labels[tr][:, pool], len(te)), lab),
            "oracle": score_accuracy(baselines.oracle(lab), lab),
        }
        say(f"pool {n}: router {row['icl-router']:.1f} knn-tuned {row['knn-tuned']:.1f}")
        out.append(row)
    return out


def routerbench_section(cfg: EvaluateConfig, *, cache: Path) -> dict:
    """Cost/quality on RouterBench's own train/test split: the cost policy (p - cost_weight * cost,
    swept) on the router's p through its decision layer, on the tuned neighbour rule's p with its
    guard and on kNN's p, beside each single model and the oracle; AIQ of each curve, the accuracy
    at 25% and 50% of the reference model's cost and the cost of matching its accuracy."""
    from icl_router.data.dataset import correctness_matrix
    from icl_router.evaluation.cost import aiq, cost_to_reach, quality_at_cost, utility_curve
    from icl_router.routing.decision import guarded_choice

    rb = cfg.routerbench
    entry = EvalDatasetConfig(name="routerbench-cost", dataset=rb.dataset, format=rb.format, split=SplitConfig(name="given"), view="last-block")
    ds, emb_name = open_entry(cfg, entry)
    rs, queries = dense(ds, embedder=emb_name, split=entry.split)
    if rb.reference_model not in rs.models:
        raise ConfigError(f"routerbench.reference_model {rb.reference_model!r} is not in {ds.root}'s pool {rs.models}")
    costs = correctness_matrix(ds.read_outcomes(rs.models), rs.query_ids, rs.models, column=schemas.COST)  # [N, M]
    seed = cfg.seeds[0]
    rc = cfg.icl_router.model_copy(update={"checkpoints": None, "k": rb.k or cfg.icl_router.k})
    rs = for_seed(rs, queries, entry.split, seed=seed, k=rc.k)
    tr, te = rs.rows("train"), rs.rows("test")
    r = get_router(rc, rs, seed=seed, seed_i=0, cache=cache, label="routerbench")
    lab, c = rs.labels[te], costs[te]
    est = np.nanmean(costs[tr], axis=0)  # [M] the per-model cost the policy decides on
    ws = rb.cost_weights

    def router_choice(p: np.ndarray, w: float) -> np.ndarray:
        return decide(r, rs, te, p, policy=Policy("cost", cost_weight=w), costs=est)[0]

    params = baselines.knn_tuned_fit(rs.embeddings[tr], rs.labels[tr], seed=seed)
    prior_tr = np.nanmean(rs.labels[tr], axis=0)

    def tuned_choice(p: np.ndarray, w: float) -> np.ndarray:  # its guard in utility, like the router's
        return guarded_choice(p, int(np.argmax(prior_tr - w * est)), params["delta"], cost_weight=w, costs=est)

    curves = {
        "icl-router": utility_curve(raw_p(r, rs, te, rc), lab, c, est_costs=est, cost_weights=ws, choose=router_choice),
        "knn-tuned": utility_curve(baselines.knn_tuned_p(rs.embeddings[tr], rs.labels[tr], rs.embeddings[te], params), lab, c, est_costs=est, cost_weights=ws, choose=tuned_choice),
        "knn": utility_curve(baselines.knn(rs.embeddings[tr], rs.labels[tr], rs.embeddings[te], k=cfg.knn_k), lab, c, est_costs=est, cost_weights=ws),
    }
    singles = {m: {"cost": float(np.nanmean(c[:, j])), "quality": float(100 * np.nanmean(lab[:, j]))} for j, m in enumerate(rs.models)}
    c_min, c_max = min(s["cost"] for s in singles.values()), max(s["cost"] for s in singles.values())
    pts = lambda curve: np.array([[p["cost"], p["quality"]] for p in curve])  # noqa: E731
    ref = singles[rb.reference_model]
    out_aiq = {k: aiq(pts(v), c_min=c_min, c_max=c_max) for k, v in curves.items()}
    single_pts = pts(singles.values())
    oracle_pick = np.where(np.nan_to_num(lab) >= 0.5, c, np.inf).argmin(1)  # the cheapest correct model
    any_right = (np.nan_to_num(lab) >= 0.5).any(1)
    oracle_cost = float(np.nanmean(np.where(any_right, c[np.arange(len(te)), oracle_pick], np.nanmin(c, axis=1))))
    with_singles = {k: np.concatenate([pts(v), single_pts]) for k, v in curves.items()}  # a router may always send everything to one model
    report = {
        "n_test": int(len(te)),
        "models": rs.models,
        "reference_model": rb.reference_model,
        "reference": ref,
        "single": singles,
        "curves": curves,
        "aiq": out_aiq,
        "single_hull_aiq": aiq(single_pts, c_min=c_min, c_max=c_max),
        "acc_at_25pct_gpt4_cost": {k: quality_at_cost(v, 0.25 * ref["cost"]) for k, v in with_singles.items()},
        "acc_at_50pct_gpt4_cost": {k: quality_at_cost(v, 0.50 * ref["cost"]) for k, v in with_singles.items()},
        "cost_to_match_gpt4": {k: cost_to_reach(pts(v), ref["quality"]) for k, v in curves.items()},
        "cost_range": [c_min, c_max],
        "oracle": {"cost": oracle_cost, "quality": float(100 * any_right.mean())},
        "decision": None if r.decision is None else r.decision.to_json(),
        "knn_tuned_params": params,
    }
    say(f"routerbench AIQ single hull {report['single_hull_aiq']:.1f}, " + ", ".join(f"{k} {v:.1f}" for k, v in out_aiq.items()))
    return report


# ---------------------------------------------------------------------------
# One dataset


def sample_test(rs: RoutingSet, n: int | None, *, seed: int) -> RoutingSet:
    """The routing set with at most ``n`` of its ID-test and ``n`` of its OOD queries (a seeded sample, in
    dataset order); train, and so the anchors and every method's fit, unchanged. ``n`` None: as is."""
    if n is None:
        return rs
    from icl_router.data.splits import Split

    rng = np.random.RandomState(seed)

    def pick(ids: list[str]) -> list[str]:
        return list(ids) if len(ids) <= n else [ids[i] for i in sorted(rng.choice(len(ids), n, replace=False))]

    return dataclasses.replace(rs, split=Split(list(rs.split.train), pick(rs.split.test), pick(rs.split.ood)))


PARTS = (("test", "id"), ("ood", "ood"))  # (split part, report key)
CALIBRATION = ("ece", "brier", "ece_raw", "brier_raw", "away_from_default")


@dataclass
class RouterOnPart:
    """The router on one seed's ID test or OOD rows: its routed accuracy four ways, its calibration and its p."""

    routed: float  # with its decision layer, the queries naming their task (icl-router)
    no_task: float  # the same, no task named (icl-router-no-task)
    raw: float  # the raw p's argmax (icl-router-raw)
    evidence: float | None  # its evidence head alone through the same layer (icl-router-evidence); None without one
    calibration: dict[str, float]  # CALIBRATION
    p: np.ndarray  # [n, T] after the decision layer
    raw_p: np.ndarray  # [n, T] before it
    labels: np.ndarray  # [n, T]


@dataclass
class SeedResult:
    """Every method on one seed of one dataset."""

    baselines: dict[str, dict[str, float]]  # baseline_scores: {method: {part key: accuracy}}
    router: dict[str, RouterOnPart]  # part key -> the router there
    text_router: dict[str, float]  # part key -> the text router's accuracy (icl-router-text); empty without one

    def accuracies(self) -> dict[str, dict[str, float]]:
        """{method: {part key: routed accuracy}} as the report names the methods."""
        out = {m: dict(v) for m, v in self.baselines.items()}
        for key, r in self.router.items():
            named = {"icl-router": r.routed, "icl-router-no-task": r.no_task, "icl-router-raw": r.raw, "icl-router-evidence": r.evidence}
            for m, v in named.items():
                if v is not None:
                    out.setdefault(m, {})[key] = v
        for key, v in self.text_router.items():
            out.setdefault("icl-router-text", {})[key] = v
        return out


def router_on_part(r: Routed, rs: RoutingSet, rows: np.ndarray, rc: EvalRouterConfig) -> RouterOnPart:
    from icl_router.evaluation import calibration as calibration_metrics

    lab = rs.labels[rows]
    p = raw_p(r, rs, rows, rc)
    choice, q, default = decide(r, rs, rows, p)
    s = calibration_metrics.summary(q, lab, choice, default if default is not None else int(np.argmax(r.prior)))
    return RouterOnPart(
        routed=routed_accuracy(choice, lab),
        no_task=routed_accuracy(decide(r, rs, rows, p, tasks=False)[0], lab),
        raw=score_accuracy(p, lab),
        evidence=None if r.router.evidence is None else routed_accuracy(decide(r, rs, rows, evidence_p(r, rs, rows))[0], lab),
        calibration={"ece": s["ece"], "brier": s["brier"], "away_from_default": s["away_from_default"],
                     "ece_raw": calibration_metrics.ece(p, lab), "brier_raw": calibration_metrics.brier(p, lab)},
        p=q, raw_p=p, labels=lab,
    )


def evaluate_seed(cfg: EvaluateConfig, d: EvalDatasetConfig, rs: RoutingSet, rs0: RoutingSet, queries: Any, *, seed: int, si: int, k: int,
                  cache: Path, extra: dict[str, Any]) -> tuple[SeedResult, Routed]:
    """Every method on one seed's routing set ``rs`` (K=``k`` anchors); the routers' training info and decision
    layers go into ``extra``. Returns the result and the ICL-Router it routed with."""
    result = SeedResult(baseline_scores(rs, knn_k=cfg.knn_k, seed=seed), {}, {})
    routed = None
    for name, rc in (("icl-router", cfg.icl_router.model_copy(update={"k": k})), ("icl-router-text", cfg.icl_router_text)):
        if rc is None:
            continue
        rs_v = rs if rc.k == k else sample_test(for_seed(rs0, queries, d.split, seed=seed, k=rc.k), cfg.test_sample, seed=seed)
        r = get_router(rc, rs_v, seed=seed, seed_i=si, cache=cache, label=f"{d.name} {name} seed {seed}")
        extra["train_info"][f"{name}/{seed}"] = dict(r.info)
        for part, key in PARTS:
            rows = rs_v.rows(part)
            if len(rows) == 0:
                continue
            if name == "icl-router":
                result.router[key] = router_on_part(r, rs_v, rows, rc)
            else:
                result.text_router[key] = routed_accuracy(decide(r, rs_v, rows, raw_p(r, rs_v, rows, rc))[0], rs_v.labels[rows])
        if name == "icl-router":
            extra["decision"][str(seed)] = None if r.decision is None else r.decision.to_json()
            routed = r
        acc = result.accuracies().get(name, {})
        say(f"{d.name} {name} seed {seed}: " + " ".join(f"{key.upper()} {acc[key]:.1f}" for key in ("id", "ood") if key in acc))
    return result, routed


def evaluate_dataset(cfg: EvaluateConfig, d: EvalDatasetConfig, *, first: bool, cache: Path) -> dict:
    """Every method on this dataset's ID test and OOD rows for every seed: its report entry."""
    ds, emb_name = open_entry(cfg, d)
    rs0, queries = dense(ds, embedder=emb_name, split=d.split)
    k = d.k or cfg.icl_router.k
    extra: dict[str, Any] = {"train_info": {}, "decision": {}}
    results = []
    for si, seed in enumerate(cfg.seeds):
        say(f"{d.name}: seed {seed} ({si + 1}/{len(cfg.seeds)})")
        rs = sample_test(for_seed(rs0, queries, d.split, seed=seed, k=k), cfg.test_sample, seed=seed)
        result, routed = evaluate_seed(cfg, d, rs, rs0, queries, seed=seed, si=si, k=k, cache=cache, extra=extra)
        results.append(result)
        if si == 0 and first:
            extra.update(first_seed_sections(cfg, d, rs, rs0, queries, routed, seed=seed, cache=cache))
    return {
        "methods": methods_table(results),
        "dataset": str(ds.root),
        "models": rs0.models,
        "k": k,
        "n": {"train": int(len(rs.rows("train"))), "id": int(len(rs.rows("test"))), "ood": int(len(rs.rows("ood")))},
        "calibration": calibration_table(results),
        **extra,
    }


def first_seed_sections(cfg: EvaluateConfig, d: EvalDatasetConfig, rs: RoutingSet, rs0: RoutingSet, queries: Any, routed: Routed | None, *,
                        seed: int, cache: Path) -> dict[str, Any]:
    """The experiments run on the first dataset's first seed: adding a model, accuracy vs K and vs pool size."""
    out: dict[str, Any] = {}
    if cfg.add_model:
        out["add_model"] = add_model_section(cfg, rs, routed, seed=seed, cache=cache)
    if cfg.k_sweep:
        out["k_sweep"] = k_section(cfg, d, rs0, queries, seed=seed, cache=cache)
    if cfg.pool_sizes:
        out["pool_sizes"] = pool_section(cfg, rs, seed=seed, cache=cache)
    return out


def methods_table(results: list[SeedResult]) -> dict[str, dict]:
    """{method: {part key: {mean, std, per_seed}}} over the seeds, in METHODS order; methods with no figure are left out."""
    per_seed = [r.accuracies() for r in results]
    out = {}
    for m in METHODS:
        parts = {key: [acc[m][key] for acc in per_seed if key in acc.get(m, {})] for _, key in PARTS}
        parts = {key: v for key, v in parts.items() if v}
        if parts:
            out[m] = {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for key, v in parts.items()}
    return out


def calibration_table(results: list[SeedResult]) -> dict[str, dict]:
    """Per part key: the router's calibration figures, mean over seeds, and the reliability of the p pooled over seeds."""
    from icl_router.evaluation import calibration as calibration_metrics

    out = {}
    for _, key in PARTS:
        on = [r.router[key] for r in results if key in r.router]
        if not on:
            continue
        out[key] = {f: float(np.mean([o.calibration[f] for o in on])) for f in CALIBRATION}
        lab = np.concatenate([o.labels for o in on])
        out[key]["reliability"] = calibration_metrics.reliability(np.concatenate([o.p for o in on]), lab)
        out[key]["reliability_raw"] = calibration_metrics.reliability(np.concatenate([o.raw_p for o in on]), lab)
    return out


BARS = ("best-single", "knn-tuned", "knn-tuned-task")


def deltas(datasets: dict[str, dict]) -> dict[str, dict]:
    """router - best single, router - knn-tuned and router - knn-tuned-task (the rule reading the task, as the
    router does) per dataset and split, and their means over datasets."""
    out: dict[str, dict] = {}
    for name, rep in datasets.items():
        m = rep["methods"]
        if "icl-router" not in m:
            continue
        out[name] = {
            part: {f"vs_{b.replace('-', '_')}": m["icl-router"][part]["mean"] - m[b][part]["mean"] for b in BARS if b in m}
            for part in ("id", "ood")
            if part in m["icl-router"]
        }
    if out:
        cells = [v for parts in out.values() for v in parts.values()]
        out["mean"] = {"all": {k: float(np.mean([c[k] for c in cells])) for k in cells[0]}}
    return out


def run_evaluate(cfg: EvaluateConfig) -> dict:
    from icl_router.evaluation.report import write_report

    t0 = time.time()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output or "runs/evaluate")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir)
    datasets = {}
    for i, d in enumerate(cfg.datasets):
        t1 = time.time()
        datasets[d.name] = evaluate_dataset(cfg, d, first=i == 0, cache=cache)
        datasets[d.name]["seconds"] = round(time.time() - t1, 1)
    first = datasets[cfg.datasets[0].name]
    report: dict[str, Any] = {
        "datasets": datasets,
        "delta": deltas(datasets),
        # the first dataset's table and sections at the top level: the standard report's keys
        "methods": first["methods"],
        "dataset": first["dataset"],
        "models": first["models"],
        "n": first["n"],
        "seeds": cfg.seeds,
        **{k: first[k] for k in ("add_model", "k_sweep", "pool_sizes") if k in first},
    }
    if cfg.routerbench is not None:
        report["routerbench"] = routerbench_section(cfg, cache=cache)
    report["config"] = cfg.model_dump(mode="json")
    report["seconds"] = round(time.time() - t0, 1)
    write_report(report, out)
    say(f"report written to {out} in {report['seconds']:.0f} s")
    return {
        "output": str(out),
        "seconds": report["seconds"],
        **{
            name: {m: {k: round(v["mean"], 1) for k, v in parts.items()} for m, parts in rep["methods"].items() if m in ("icl-router", "best-single", "knn-tuned", "knn-tuned-task")}
            for name, rep in datasets.items()
        },
    }
