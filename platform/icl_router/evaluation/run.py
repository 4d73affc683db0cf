"""``icl-router evaluate``: the standard protocol end to end, beside every baseline.

Per seed: the seed's split, K anchors on its train part, the baselines (random,
best single, max expert, kNN, logistic regression, oracle) and the ICL-Router
variants (trained in-process with the Ray Train job's steps, or loaded from given
router directories), all on the same rows. On the first seed also: the add-model
experiment, accuracy vs K and vs pool size. Then the RouterBench cost/quality
section. Writes ``report.json``, ``report.md`` and PNG plots to the output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from icl_router import schemas as S
from icl_router.config import (
    ConfigError,
    EvalRouterConfig,
    EvaluateConfig,
    SplitConfig,
    TrainConfig,
)
from icl_router.data.dataset import Dataset, DatasetError
from icl_router.data.routing_set import RoutingSet, load_routing_set
from icl_router.evaluation import baselines as B
from icl_router.evaluation import fit as F
from icl_router.train.data import build_train_data

METHODS = ["icl-router", "icl-router-evidence", "icl-router-text", "random", "best-single", "max-expert", "knn", "logreg", "oracle"]


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
    done = set(ds.read_embeddings(name).column(S.QUERY_ID).to_pylist())
    todo = [(i, t) for i, t in zip(q.column(S.QUERY_ID).to_pylist(), q.column(S.TEXT).to_pylist()) if i not in done]
    if not todo:
        return
    from icl_router.data.embed import BUNDLED, load_embedder

    if embedder == BUNDLED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model must never reach for the hub
    say(f"embedding {len(todo)} queries of {ds.root} with {embedder} (in-process)")
    model = load_embedder(embedder)
    texts = [view(t) if view else t for _, t in todo]
    emb = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    ds.append_embeddings(
        pa.table(
            {
                S.QUERY_ID: [i for i, _ in todo],
                S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
                S.EMBEDDER: [name] * len(todo),
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


# ---------------------------------------------------------------------------
# Routers


def train_config(rc: EvalRouterConfig, *, seed: int, max_steps: int | None = None) -> TrainConfig:
    return TrainConfig(
        stage=2,
        dataset="<in-memory>",
        output="<in-memory>",
        router=rc.router,
        phases=rc.phases,
        batch_size=rc.batch_size,
        max_steps=max_steps or rc.max_steps,
        max_text_tokens=rc.max_text_tokens,
        seed=seed,
    )


def get_router(rc: EvalRouterConfig, rs: RoutingSet, *, seed: int, seed_i: int, cache: Path, label: str, models: list[int] | None = None, max_steps: int | None = None) -> tuple[Any, dict]:
    """A trained router for this seed's routing set (trained here, or the given checkpoint)."""
    if rc.checkpoints is not None and models is None:
        from icl_router.model.router_dir import load_router_dir

        loaded = load_router_dir(rc.checkpoints[seed_i])
        if loaded.meta.anchor_query_ids != rs.anchor_ids:
            raise ConfigError(
                f"checkpoint {rc.checkpoints[seed_i]} was trained with other anchors than seed {seed}'s; "
                f"train it on this split with k={rc.k} and seed {seed}"
            )
        return loaded.router.eval(), {"checkpoint": rc.checkpoints[seed_i]}
    cfg = train_config(rc, seed=seed, max_steps=max_steps)
    data, val = build_train_data(rs, stage=2, val_fraction=rc.val_fraction, seed=seed, models=models)
    init = F.tiny_init(cfg, rs.texts, cache) if cfg.router.name_or_path is None else cfg.router.name_or_path
    return F.fit(cfg, data, init_dir=init, rs=rs, val=val if len(val) else None, eval_every=rc.eval_every, label=label)


def icl_scores(router: Any, rs: RoutingSet, rows: np.ndarray, rc: EvalRouterConfig, info: dict, *, models: list[int] | None = None) -> np.ndarray:
    """p [len(rows), T] for the pool ``models`` (default: all), per-model calibrated when the router has a calibration."""
    p = F.score(router, rs, rows, rs.profiles([rs.models[m] for m in models]) if models else rs.profiles(), max_text_tokens=rc.max_text_tokens)
    cal = info.get("calibration")
    return F.calibrate(p, cal) if rc.calibrate and cal is not None and len(cal) == p.shape[1] else p


def evidence_scores(router: Any, rs: RoutingSet, rows: np.ndarray) -> np.ndarray:
    """p [len(rows), T] of the router's anchor-evidence head alone: the serving path that skips the LM."""
    from icl_router.routing.fast import EvidenceScorer

    fast = EvidenceScorer.from_router(router, dict(zip(rs.models, rs.profiles())))
    return fast.score(query_emb=rs.embeddings[rows])


# ---------------------------------------------------------------------------
# The sections


def baseline_scores(rs: RoutingSet, *, knn_k: int) -> dict[str, dict[str, float]]:
    """{method: {"id": acc, "ood": acc}} of the baselines on this seed's ID test and OOD rows."""
    tr = rs.rows("train")
    parts = {k: rs.rows(p) for k, p in (("id", "test"), ("ood", "ood")) if len(rs.rows(p))}
    lr = B.logreg(rs.embeddings[tr], rs.labels[tr], rs.embeddings[np.concatenate(list(parts.values()))])  # one fit for both parts
    out: dict[str, dict[str, float]] = {}
    start = 0
    for key, rows in parts.items():
        lab = rs.labels[rows]
        tasks = [rs.tasks[i] for i in rows]
        res = {
            "random": B.random_expected(lab),
            "best-single": B.routed_accuracy(B.best_single(rs.labels[tr], len(rows)), lab),
            # OOD tasks have no train queries: their best model is picked on test (README)
            "max-expert": B.routed_accuracy(B.max_expert(rs.labels[tr], [rs.tasks[i] for i in tr], tasks, test_labels=lab), lab),
            "knn": B.routed_accuracy(B.knn(rs.embeddings[tr], rs.labels[tr], rs.embeddings[rows], k=knn_k), lab),
            "logreg": B.routed_accuracy(lr[start : start + len(rows)], lab),
            "oracle": B.routed_accuracy(B.oracle(lab), lab),
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


def add_model_section(cfg: EvaluateConfig, rs: RoutingSet, full_p: np.ndarray, *, seed: int, cache: Path) -> list[dict]:
    """Per model: trained without it, added by its profile only vs the router trained with it (ID test)."""
    te = rs.rows("test")
    lab = rs.labels[te]
    out = []
    for j, name in enumerate(rs.models):
        others = [m for m in range(len(rs.models)) if m != j]
        router, info = get_router(cfg.icl_router, rs, seed=seed, seed_i=0, cache=cache, label=f"add-model -{name}", models=others, max_steps=cfg.sweep_max_steps)
        if info.get("calibration") is not None:  # the added model has no held-out labels: it gets the others' mean calibration
            info["calibration"] = np.insert(info["calibration"], j, info["calibration"].mean(0), axis=0)
        p = icl_scores(router, rs, te, cfg.icl_router, info)  # all models; j's profile was never trained on
        known = ~np.isnan(lab[:, j])
        out.append(
            {
                "model": name,
                "acc_added": B.routed_accuracy(p, lab),
                "acc_trained": B.routed_accuracy(full_p, lab),
                "acc_without": B.routed_accuracy(p[:, others], lab[:, others]),
                "auc_added": auc(p[known, j], lab[known, j] >= 0.5),
                "auc_trained": auc(full_p[known, j], lab[known, j] >= 0.5),
                "share_added": float(100 * np.mean(p.argmax(1) == j)),
                "share_trained": float(100 * np.mean(full_p.argmax(1) == j)),
            }
        )
        say(f"add-model {name}: added {out[-1]['acc_added']:.1f} trained-with {out[-1]['acc_trained']:.1f} without {out[-1]['acc_without']:.1f}")
    return out


def k_section(cfg: EvaluateConfig, rs0: RoutingSet, queries: Any, *, seed: int, cache: Path) -> list[dict]:
    out = []
    for k in cfg.k_sweep:
        rc = cfg.icl_router.model_copy(update={"k": k, "checkpoints": None})
        rs = F.for_seed(rs0, queries, cfg.split, seed=seed, k=k)
        router, info = get_router(rc, rs, seed=seed, seed_i=0, cache=cache, label=f"K={k}", max_steps=cfg.sweep_max_steps)
        row = {"k": k, "steps": info.get("steps")}
        for part, key in (("test", "id"), ("ood", "ood")):
            rows = rs.rows(part)
            row[key] = B.routed_accuracy(icl_scores(router, rs, rows, rc, info), rs.labels[rows])
        say(f"K={k}: ID {row['id']:.1f} OOD {row['ood']:.1f}")
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
        router, info = get_router(cfg.icl_router, rs, seed=seed, seed_i=0, cache=cache, label=f"pool {n}", models=pool, max_steps=cfg.sweep_max_steps)
        lab = rs.labels[te][:, pool]
        row = {
            "n": n,
            "models": [rs.models[m] for m in pool],
            "icl-router": B.routed_accuracy(icl_scores(router, rs, te, cfg.icl_router, info, models=pool), lab),
            "knn": B.routed_accuracy(B.knn(rs.embeddings[tr], rs.labels[tr][:, pool], rs.embeddings[te], k=cfg.knn_k), lab),
            "best-single": B.routed_accuracy(B.best_single(rs.labels[tr][:, pool], len(te)), lab),
            "oracle": B.routed_accuracy(B.oracle(lab), lab),
        }
        say(f"pool {n}: router {row['icl-router']:.1f} knn {row['knn']:.1f}")
        out.append(row)
    return out


def routerbench_section(cfg: EvaluateConfig, *, cache: Path) -> dict:
    """Cost/quality on RouterBench's own train/test split: the margin policy on the router's
    p and on kNN's, beside each single model and the oracle; AIQ of each curve."""
    from icl_router.data.dataset import correctness_matrix
    from icl_router.evaluation.cost import aiq, policy_curve

    rb = cfg.routerbench
    ds = open_dataset(resolve(cfg.data_root, rb.dataset), rb.format, cache_dir=cfg.cache_dir)
    name = f"{cfg.embedder}+last-block"
    ensure_embeddings(ds, embedder=cfg.embedder, name=name, view=last_block)
    rs, queries = dense(ds, embedder=name, split=SplitConfig(name="given"))
    costs = correctness_matrix(ds.read_outcomes(rs.models), rs.query_ids, rs.models, column=S.COST)  # [N, M]
    seed = cfg.seeds[0]
    rc = cfg.icl_router.model_copy(update={"checkpoints": None, "k": rb.k or cfg.icl_router.k})
    rs = F.for_seed(rs, queries, SplitConfig(name="given"), seed=seed, k=rc.k)
    tr, te = rs.rows("train"), rs.rows("test")
    router, info = get_router(rc, rs, seed=seed, seed_i=0, cache=cache, label="routerbench")
    lab, c = rs.labels[te], costs[te]
    est = np.nanmean(costs[tr], axis=0)  # [M] the per-model cost the policy decides on
    curves = {
        "icl-router": policy_curve(icl_scores(router, rs, te, rc, info), lab, c, est_costs=est, margins=rb.margins),
        "knn": policy_curve(B.knn(rs.embeddings[tr], rs.labels[tr], rs.embeddings[te], k=cfg.knn_k), lab, c, est_costs=est, margins=rb.margins),
    }
    singles = {m: {"cost": float(np.nanmean(c[:, j])), "quality": float(100 * np.nanmean(lab[:, j]))} for j, m in enumerate(rs.models)}
    c_min, c_max = min(s["cost"] for s in singles.values()), max(s["cost"] for s in singles.values())
    pts = lambda curve: np.array([[p["cost"], p["quality"]] for p in curve])  # noqa: E731
    aiqs = {k: aiq(pts(v), c_min=c_min, c_max=c_max) for k, v in curves.items()}
    aiqs["single models (zero router)"] = aiq(pts(singles.values()), c_min=c_min, c_max=c_max)
    oracle_pick = np.where(np.nan_to_num(lab) >= 0.5, c, np.inf).argmin(1)  # the cheapest correct model
    any_right = (np.nan_to_num(lab) >= 0.5).any(1)
    oracle_cost = float(np.nanmean(np.where(any_right, c[np.arange(len(te)), oracle_pick], np.nanmin(c, axis=1))))
    say("routerbench AIQ " + ", ".join(f"{k} {v:.1f}" for k, v in aiqs.items()))
    return {
        "n_test": int(len(te)),
        "models": rs.models,
        "single": singles,
        "curves": curves,
        "aiq": aiqs,
        "cost_range": [c_min, c_max],
        "oracle": {"cost": oracle_cost, "quality": float(100 * any_right.mean())},
    }


# ---------------------------------------------------------------------------


def run_evaluate(cfg: EvaluateConfig) -> dict:
    from icl_router.evaluation.report import write_report

    t0 = time.time()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output or "runs/evaluate")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir)
    ds = open_dataset(resolve(cfg.data_root, cfg.dataset), cfg.format, cache_dir=cfg.cache_dir)
    ensure_embeddings(ds, embedder=cfg.embedder, name=cfg.embedder)
    rs0, queries = dense(ds, embedder=cfg.embedder, split=cfg.split)
    variants = {"icl-router": cfg.icl_router, "icl-router-text": cfg.icl_router_text}
    per_seed: dict[str, dict[str, list[float]]] = {m: {"id": [], "ood": []} for m in METHODS}
    extra: dict[str, Any] = {"seeds": cfg.seeds, "train_info": {}}
    for si, seed in enumerate(cfg.seeds):
        say(f"seed {seed} ({si + 1}/{len(cfg.seeds)})")
        rs = F.for_seed(rs0, queries, cfg.split, seed=seed, k=cfg.icl_router.k)
        for m, parts in baseline_scores(rs, knn_k=cfg.knn_k).items():
            for key, v in parts.items():
                per_seed[m][key].append(v)
        for name, rc in variants.items():
            if rc is None:
                continue
            rs_v = rs if rc.k == cfg.icl_router.k else F.for_seed(rs0, queries, cfg.split, seed=seed, k=rc.k)
            router, info = get_router(rc, rs_v, seed=seed, seed_i=si, cache=cache, label=f"{name} seed {seed}")
            extra["train_info"][f"{name}/{seed}"] = {k: v for k, v in info.items() if k not in ("val_curve", "calibration")}
            for part, key in (("test", "id"), ("ood", "ood")):
                rows = rs_v.rows(part)
                if len(rows) == 0:
                    continue
                p = icl_scores(router, rs_v, rows, rc, info)
                per_seed[name][key].append(B.routed_accuracy(p, rs_v.labels[rows]))
                if name == "icl-router" and getattr(router, "evidence", None) is not None:  # the same router's evidence head alone (routing/fast.py)
                    per_seed["icl-router-evidence"][key].append(B.routed_accuracy(evidence_scores(router, rs_v, rows), rs_v.labels[rows]))
                if name == "icl-router" and si == 0 and part == "test":
                    first_p = p
            say(f"{name} seed {seed}: ID {per_seed[name]['id'][-1]:.1f} OOD {per_seed[name]['ood'][-1] if per_seed[name]['ood'] else float('nan'):.1f}")
        if si == 0:
            if cfg.add_model:
                extra["add_model"] = add_model_section(cfg, rs, first_p, seed=seed, cache=cache)
            if cfg.k_sweep:
                extra["k_sweep"] = k_section(cfg, rs0, queries, seed=seed, cache=cache)
            if cfg.pool_sizes:
                extra["pool_sizes"] = pool_section(cfg, rs, seed=seed, cache=cache)
    if cfg.routerbench is not None:
        extra["routerbench"] = routerbench_section(cfg, cache=cache)
    methods = {
        m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for k, v in parts.items() if v}
        for m, parts in per_seed.items()
        if parts["id"]
    }
    report = {
        "methods": methods,
        "dataset": str(ds.root),
        "models": rs0.models,
        "n": {"train": int(len(rs.rows("train"))), "id": int(len(rs.rows("test"))), "ood": int(len(rs.rows("ood")))},
        "config": cfg.model_dump(mode="json"),
        "seconds": round(time.time() - t0, 1),
        **extra,
    }
    write_report(report, out)
    say(f"report written to {out} in {report['seconds']:.0f} s")
    return {
        "output": str(out),
        "seconds": report["seconds"],
        **{m: {k: round(v["mean"], 1) for k, v in parts.items() if k in ("id", "ood")} for m, parts in methods.items()},
    }
