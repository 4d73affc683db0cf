"""``icl-router demo`` (``make demo``): the whole platform on the embedded default.

On local Ray: generate the synthetic dataset, embed it (Ray Data), pick anchors,
train both stages (Ray Train + DeepSpeed, with the settings of
jobs/train-stage{1,2}/config.yaml) without one model, evaluate beside the
baselines, value the held-out model beside the pool from its profile alone
(``icl-router value``), register it from its anchor outcomes (no retraining),
evaluate again, and write a report with a plot: the estimated gain beside the
gain measured after registration.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import numpy as np

from icl_router.config import (
    AnchorsConfig,
    DemoConfig,
    EmbedConfig,
    PhaseConfig,
    SplitConfig,
    TrainConfig,
    build_config,
    deep_merge,
    read_config_file,
)

STEPS = 8
SERVED = ["synth-math-7b", "synth-tiny-1b"]  # the pool of serve/demo.yaml


def _say(i: int, msg: str) -> None:
    sys.stderr.write(f"[demo {i}/{STEPS} {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _phases(phases: list[PhaseConfig], *, epochs: int, lr: float) -> list[dict[str, Any]]:
    """The job's phases cut to ``epochs`` in all (earlier phases keep theirs, the last takes the rest,
    an emptied phase is dropped), every non-zero rate set to ``lr`` (a frozen part stays frozen)."""
    out, left = [], epochs
    for i, ph in enumerate(phases):
        n = left if i == len(phases) - 1 else min(ph.epochs, left)
        if n > 0:
            out.append({"epochs": n, "lr_projector": lr if ph.lr_projector > 0 else 0.0, "lr_router": lr if ph.lr_router > 0 else 0.0})
        left -= n
    return out


def _train_config(cfg: DemoConfig, out: Path, *, stage: int, models: list[str]) -> TrainConfig:
    """jobs/train-stage{1,2}/config.yaml (shipped in the package as ``resources/train-stage{1,2}.yaml``)
    with the demo's paths, models, seed, epochs and knobs (rates, anchor evidence, workers, Ray)."""
    resource = files("icl_router") / "resources" / f"train-stage{stage}.yaml"
    with as_file(resource) as path:
        data = read_config_file(path)
    job = build_config(TrainConfig, data, source=str(resource))
    demo = {
        "dataset": str(out / "data"),
        "output": str(out / ("router-stage1" if stage == 1 else "router")),
        "init_from": str(out / "router-stage1") if stage == 2 else None,
        "models": models,
        "seed": cfg.seed,
        "embedder": cfg.embedder,
        "phases": _phases(job.phases, epochs=cfg.stage1_epochs if stage == 1 else cfg.stage2_epochs, lr=cfg.stage1_lr if stage == 1 else cfg.stage2_lr),
        "scaling": {"num_workers": cfg.num_workers},
        "ray": cfg.ray.model_dump(),
    }
    if stage == 2:  # the evidence is a stage-2 head
        demo["router"] = {"anchor_evidence": cfg.anchor_evidence}
    return build_config(TrainConfig, deep_merge(data, demo), source=f"{resource} + the demo's settings")


def evaluate_router(router_dir: Path, data_dir: Path, *, embedder: str) -> dict[str, dict[str, float]]:
    """Routed accuracy (percent) on the test (ID) and OOD parts: the router's pool, through the Python
    API the service's path runs (decision layer included), beside the baselines on all models."""
    from icl_router.api import Router
    from icl_router.data.routing_set import load_routing_set
    from icl_router.evaluation import baselines as B
    from icl_router.evaluation.run import baseline_scores

    rs = load_routing_set(data_dir, split=SplitConfig(name="given"), embedder=embedder)
    router = Router.load(router_dir, embedder=embedder)
    cols = [rs.models.index(m) for m in router.models]
    out = baseline_scores(rs, knn_k=20, seed=0)
    out["icl-router"], out["icl-router-task"], out["icl-router-raw"], out["away"] = {}, {}, {}, {}
    for key, part in (("id", "test"), ("ood", "ood")):
        rows = rs.rows(part)
        texts = [rs.texts[r] for r in rows]
        lab = rs.labels[rows][:, cols]
        decisions = router.route(texts)
        chosen = np.array([router.models.index(d.model) for d in decisions])
        out["icl-router"][key] = float(100 * np.nanmean(lab[np.arange(len(rows)), chosen]))
        out["icl-router-raw"][key] = B.routed_accuracy(router.scores_and_mass(texts).p, lab)
        named = router.route(texts, tasks=[rs.tasks[r] for r in rows])  # each query naming its task (decision.task)
        out["icl-router-task"][key] = float(100 * np.nanmean(lab[np.arange(len(rows)), [router.models.index(d.model) for d in named]]))
        out["away"][key] = float(100 * np.mean([d.default is not None and d.model != d.default for d in decisions]))
        out.setdefault("traffic", {})[key] = {m: float(np.mean(chosen == i)) for i, m in enumerate(router.models)}
    return out


def value_held_out(router_dir: Path, data_dir: Path, *, held_out: str, output: Path) -> dict[str, Any]:
    """``icl-router value`` before the held-out model is registered: its estimated gain and traffic
    share on the ID test queries, and what each pool model is worth (the loss from removing it)."""
    from icl_router.config import ValueConfig
    from icl_router.value import run_value

    cfg = ValueConfig(
        router=str(router_dir),
        dataset=str(data_dir),
        candidates=[{"name": held_out}],
        evaluation={"split": {"name": "given"}, "part": "test", "max_queries": None},
        output=str(output),
    )
    run_value(cfg)
    return json.loads((output / "value.json").read_text())


def _value_table(value: dict, before: dict, after: dict, *, held_out: str) -> str:
    """Every model's estimated worth (the candidate's gain from adding it, a pool model's from removing
    it, negated), best first, beside what registering the candidate measured (ID test)."""
    rows = [(r["gain"], r["model"], "candidate", r["traffic_share"]) for r in value["candidates"]]
    rows += [(-r["gain"], r["model"], "pool", r["traffic_share"]) for r in value["removals"]]
    measured = after["icl-router"]["id"] - before["icl-router"]["id"]
    lines = [
        "| rank | model | estimated worth (points) | estimated traffic share | measured gain after registration (points) | measured traffic share |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, (worth, m, kind, share) in enumerate(sorted(rows, key=lambda r: -r[0]), 1):
        got = f"{measured:+.2f} | {100 * after['traffic']['id'].get(m, 0.0):.1f}%" if m == held_out else "— | —"
        lines.append(f"| {i} | `{m}` ({kind}) | {worth:+.2f} | {100 * share:.1f}% | {got} |")
    return "\n".join(lines)


def _table(before: dict, after: dict, *, held_out: str) -> str:
    lines = ["| method | ID | OOD |", "|---|---|---|"]
    lines.append(f"| icl-router, pool without {held_out} | {before['icl-router']['id']:.1f} | {before['icl-router']['ood']:.1f} |")
    lines.append(f"| icl-router, {held_out} registered (no retraining) | {after['icl-router']['id']:.1f} | {after['icl-router']['ood']:.1f} |")
    lines.append(f"| the same, each query naming its task | {after['icl-router-task']['id']:.1f} | {after['icl-router-task']['ood']:.1f} |")
    lines.append(f"| the same, argmax without the decision layer | {after['icl-router-raw']['id']:.1f} | {after['icl-router-raw']['ood']:.1f} |")
    lines.append(f"| queries the guard let leave the default model (%) | {after['away']['id']:.1f} | {after['away']['ood']:.1f} |")
    for m in ("random", "best-single", "max-expert", "knn", "knn-tuned", "logreg", "oracle"):
        lines.append(f"| {m} (all models) | {after[m]['id']:.1f} | {after[m]['ood']:.1f} |")
    return "\n".join(lines)


def _plot(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["random", "best-single", "knn", "knn-tuned", "logreg", "max-expert", "icl-router (before)", "icl-router (after)", "oracle"]
    rows = [after[n] for n in names[:6]] + [before["icl-router"], after["icl-router"], after["oracle"]]
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
    _say(2, f"embed the queries on a Ray Data actor pool ({cfg.embedder})")
    emb = run_embed(EmbedConfig(dataset=str(data), embedder=cfg.embedder, ray=cfg.ray))
    _say(3, f"pick K={cfg.k} anchors on the train split")
    run_anchors(AnchorsConfig(dataset=str(data), k=cfg.k, seed=cfg.seed, split=SplitConfig(name="given")))
    _say(4, f"train stage 1 (query reconstruction) on Ray Train + DeepSpeed, {cfg.num_workers} workers")
    s1 = run_train(_train_config(cfg, out, stage=1, models=trained_on))
    _say(5, f"train stage 2 (ICL routing) on {len(trained_on)} models, {cfg.held_out} held out")
    s2 = run_train(_train_config(cfg, out, stage=2, models=trained_on))
    _say(6, "evaluate the router beside the baselines")
    router_dir = out / "router"
    before = evaluate_router(router_dir, data, embedder=emb["embedder"])
    _say(7, f"value {cfg.held_out} beside the pool from its profile alone (icl-router value), before registering it")
    value = value_held_out(router_dir, data, held_out=cfg.held_out, output=out / "value")
    _say(8, f"register {cfg.held_out} from its anchor outcomes (no retraining) and evaluate again")
    reg = register_model(router_dir, data, cfg.held_out)
    after = evaluate_router(router_dir, data, embedder=emb["embedder"])
    held = value["candidates"][0]
    value_summary = {
        "estimated_gain": held["gain"],
        "estimated_traffic_share": held["traffic_share"],
        "measured_gain": round(after["icl-router"]["id"] - before["icl-router"]["id"], 3),
        "measured_traffic_share": after["traffic"]["id"].get(cfg.held_out, 0.0),
        "estimator": value["estimator"],
        "report": str(out / "value" / "value.json"),
    }
    report = {
        "dataset": gen,
        "trained_on": trained_on,
        "held_out": cfg.held_out,
        "registered": reg,
        "train": {"stage1": s1, "stage2": s2},
        "before": before,
        "after": after,
        "value": value_summary,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    table = _table(before, after, held_out=cfg.held_out)
    vtable = _value_table(value, before, after, held_out=cfg.held_out)
    (out / "report.md").write_text(
        f"# Demo report\n\nSynthetic pool, seed {cfg.seed}; accuracy of the routed model in percent.\n\n{table}\n\n"
        f"## What {cfg.held_out} was estimated to add before it was registered (icl-router value, ID test)\n\n{vtable}\n"
    )
    _plot(before, after, out / "demo.png")
    # Stand-ins for two pool models, so `icl-router serve --config serve/demo.yaml` runs next:
    # tiny random LMs served by real vLLM (no real model can be downloaded here).
    from icl_router.testing import make_tiny_causal_lm

    for i, name in enumerate(SERVED):
        make_tiny_causal_lm(out / "pool" / name, seed=i)
    print(f"\n{table}\n\n{vtable}\n")
    print(f"Done in {report['seconds']:.0f} s. Report: {out / 'report.md'}, plot: {out / 'demo.png'}, router: {router_dir}")
    print("Serve it: icl-router serve --config serve/demo.yaml   (see README: The routing service)")
    return {"report": str(out / "report.json"), "seconds": report["seconds"], "icl_router": after["icl-router"]}
