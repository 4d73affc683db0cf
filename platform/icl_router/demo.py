"""``icl-router demo`` (``make demo``): the whole platform on the embedded default.

On local Ray: generate the synthetic dataset, embed it (Ray Data), pick anchors,
train both stages (Ray Train + DeepSpeed) without one model, evaluate beside the
baselines, register the held-out model from its anchor outcomes alone (no
retraining), evaluate again, and write a report with a plot.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from icl_router.config import (
    AnchorsConfig,
    DemoConfig,
    EmbedConfig,
    PhaseConfig,
    RouterConfig,
    ScalingConfig,
    SplitConfig,
    TrainConfig,
)

STEPS = 7
SERVED = ["synth-math-7b", "synth-tiny-1b"]  # the pool of serve/demo.yaml


def _say(i: int, msg: str) -> None:
    sys.stderr.write(f"[demo {i}/{STEPS} {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _train_config(cfg: DemoConfig, out: Path, *, stage: int, models: list[str]) -> TrainConfig:
    """The CPU settings of jobs/train-stage{1,2}/config.yaml on the demo's paths."""
    lr = cfg.stage1_lr if stage == 1 else cfg.stage2_lr
    phases = (
        [PhaseConfig(epochs=1, lr_projector=lr, lr_router=0.0), PhaseConfig(epochs=cfg.stage1_epochs - 1, lr_projector=lr, lr_router=lr)]
        if stage == 1
        else [PhaseConfig(epochs=cfg.stage2_epochs, lr_projector=lr, lr_router=lr)]
    )
    return TrainConfig(
        stage=stage,
        dataset=str(out / "data"),
        output=str(out / ("router-stage1" if stage == 1 else "router")),
        init_from=str(out / "router-stage1") if stage == 2 else None,
        models=models,
        split=SplitConfig(name="given"),
        phases=[p for p in phases if p.epochs > 0],
        router=RouterConfig(anchor_evidence=cfg.anchor_evidence and stage == 2),
        batch_size=16 if stage == 1 else 32,
        checkpoint_every=50,
        seed=cfg.seed,
        scaling=ScalingConfig(num_workers=cfg.num_workers),
        ray=cfg.ray,
    )


def evaluate_router(router_dir: Path, data_dir: Path, *, embedder: str) -> dict[str, dict[str, float]]:
    """Routed accuracy (percent) on the test (ID) and OOD parts: the router's pool vs the baselines on all models."""
    import torch

    from icl_router.data.routing_set import load_routing_set
    from icl_router.evaluation import baselines as B
    from icl_router.evaluation.run import baseline_scores
    from icl_router.routing.scorer import Scorer

    rs = load_routing_set(data_dir, split=SplitConfig(name="given"), embedder=embedder)
    scorer = Scorer.from_dir(router_dir)
    cols = [rs.models.index(m) for m in scorer.models]
    out = baseline_scores(rs, knn_k=20)
    out["icl-router"] = {}
    for key, part in (("id", "test"), ("ood", "ood")):
        rows = rs.rows(part)
        p = scorer.score([rs.texts[r] for r in rows], query_emb=torch.as_tensor(rs.embeddings[rows]))  # [n, T]
        out["icl-router"][key] = B.routed_accuracy(p, rs.labels[rows][:, cols])
    return out


def _table(before: dict, after: dict, *, held_out: str) -> str:
    lines = ["| method | ID | OOD |", "|---|---|---|"]
    lines.append(f"| icl-router, pool without {held_out} | {before['icl-router']['id']:.1f} | {before['icl-router']['ood']:.1f} |")
    lines.append(f"| icl-router, {held_out} registered (no retraining) | {after['icl-router']['id']:.1f} | {after['icl-router']['ood']:.1f} |")
    for m in ("random", "best-single", "max-expert", "knn", "logreg", "oracle"):
        lines.append(f"| {m} (all models) | {after[m]['id']:.1f} | {after[m]['ood']:.1f} |")
    return "\n".join(lines)


def _plot(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["random", "best-single", "knn", "logreg", "max-expert", "icl-router (before)", "icl-router (after)", "oracle"]
    rows = [after[n] for n in names[:5]] + [before["icl-router"], after["icl-router"], after["oracle"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, [r["id"] for r in rows], 0.4, label="ID test")
    ax.bar(x + 0.2, [r["ood"] for r in rows], 0.4, label="OOD")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("accuracy of the routed model (%)")
    ax.set_title("Demo (synthetic pool): routing accuracy before and after registering a held-out model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from icl_router.data.anchors import run_anchors
    from icl_router.data.embed import run_embed
    from icl_router.data.generate import GenerateConfig, generate_dataset
    from icl_router.routing.register import register_model
    from icl_router.train.driver import run_train

    t0 = time.time()
    out = Path(cfg.output).resolve()
    data = out / "data"
    _say(1, f"generate a synthetic pool: {cfg.n_queries} queries x {cfg.n_models} models -> {data}")
    gen = generate_dataset(data, GenerateConfig(seed=cfg.seed, n_queries=cfg.n_queries, n_models=cfg.n_models), overwrite=True).summary()
    models = sorted(gen["accuracy"])
    if cfg.held_out not in models:
        raise ValueError(f"held_out={cfg.held_out!r} is not in the generated pool {models}")
    trained_on = [m for m in models if m != cfg.held_out]
    _say(2, "embed the queries on a Ray Data actor pool (all-MiniLM-L6-v2)")
    emb = run_embed(EmbedConfig(dataset=str(data), ray=cfg.ray))
    _say(3, f"pick K={cfg.k} anchors on the train split")
    run_anchors(AnchorsConfig(dataset=str(data), k=cfg.k, seed=cfg.seed, split=SplitConfig(name="given")))
    _say(4, f"train stage 1 (query reconstruction) on Ray Train + DeepSpeed, {cfg.num_workers} workers")
    s1 = run_train(_train_config(cfg, out, stage=1, models=trained_on))
    _say(5, f"train stage 2 (ICL routing) on {len(trained_on)} models, {cfg.held_out} held out")
    s2 = run_train(_train_config(cfg, out, stage=2, models=trained_on))
    _say(6, "evaluate the router beside the baselines")
    router_dir = out / "router"
    before = evaluate_router(router_dir, data, embedder=emb["embedder"])
    _say(7, f"register {cfg.held_out} from its anchor outcomes (no retraining) and evaluate again")
    reg = register_model(router_dir, data, cfg.held_out)
    after = evaluate_router(router_dir, data, embedder=emb["embedder"])
    report = {
        "dataset": gen,
        "trained_on": trained_on,
        "held_out": cfg.held_out,
        "registered": reg,
        "train": {"stage1": s1, "stage2": s2},
        "before": before,
        "after": after,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    table = _table(before, after, held_out=cfg.held_out)
    (out / "report.md").write_text(f"# Demo report\n\nSynthetic pool, seed {cfg.seed}; accuracy of the routed model in percent.\n\n{table}\n")
    _plot(before, after, out / "demo.png")
    # Stand-ins for two pool models, so `icl-router serve --config serve/demo.yaml` runs next:
    # tiny random LMs served by real vLLM (no real model can be downloaded here).
    from icl_router.testing import make_tiny_causal_lm

    for i, name in enumerate(SERVED):
        make_tiny_causal_lm(out / "pool" / name, seed=i)
    print(f"\n{table}\n")
    print(f"Done in {report['seconds']:.0f} s. Report: {out / 'report.md'}, plot: {out / 'demo.png'}, router: {router_dir}")
    print("Serve it: icl-router serve --config serve/demo.yaml   (see README: The routing service)")
    return {"report": str(out / "report.json"), "seconds": report["seconds"], "icl_router": after["icl-router"]}
