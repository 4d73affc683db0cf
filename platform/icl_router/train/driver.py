"""Both training stages on Ray Train: a TorchTrainer whose workers run DeepSpeed.

The driver reads the dataset into a RoutingSet, prepares the initial router (a
tiny one is built here from a config; a hub id or a previous stage's directory is
loaded by each worker: the driver never loads a router LM, which on a GPU cluster
is a 7B model on a head without a GPU) and starts ``TorchTrainer(train_loop, ...)``. Every worker calls
``deepspeed.initialize`` on the ICLRouter with a torch AdamW (``loop.make_optimizer``:
projector and LM in two parameter groups whose learning rates follow the configured
phases; a part at rate 0 computes no gradients in that phase),
runs the pure steps of ``icl_router.train.steps`` on its shard of a schedule
that is fixed by the seed, and reports a checkpoint every ``checkpoint_every``
steps. After a worker dies, Ray Train restarts the group (``FailureConfig``),
the workers load the latest checkpoint and continue at its step, so the run
ends at the same step with the same batches. At the last step the rank-0 worker
exports the router directory into the checkpoint and, for stage 2, checks it against
the untrained router and fits the decision layer there, on its own device under the
device rule (``model/device.py``); the driver copies the directory to ``output``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from icl_router.config import TrainConfig, TrainStepsConfig
from icl_router.data.dataset import DatasetError, swap_into_place
from icl_router.train.data import TrainData, build_train_data

INIT_DIR = "init-lm"
STATE_FILE = "train_state.json"
DS_TAG = "ds"
ROUTER_SUBDIR = "router"
KEPT_FILE = "kept.json"  # beside the exported router in the last checkpoint: what the rank-0 keep-check decided
UNTRAINED_SUBDIR = "untrained"  # the untrained router, when the keep-check keeps it (the export stays as trained)


def _say(line: str) -> None:
    # not print(): Ray Train patches it to log each line a second time
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from icl_router.train.loop import build_router, make_optimizer, train_steps

    # The shm-comm op only serves inference all-reduce and needs LOCAL_SIZE, which Ray
    # never sets; turning it off here skips compiling the op with gcc.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    data = ray.get(loop_config["data_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")  # this worker's GPU, under the device rule
    router = build_router(cfg, anchor_emb=data.anchor_emb, init_dir=loop_config["init_dir"], device=device)
    # every part requires gradients here, so ZeRO partitions all of them; train_steps then
    # freezes a part for each phase that gives it a learning rate of 0 (loop.enter_phase)
    engine, _, _, _ = deepspeed.initialize(model=router, optimizer=make_optimizer(router, cfg), config=deepspeed_config(cfg))

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            start = json.loads((Path(d) / STATE_FILE).read_text())["step"]
        if rank == 0:
            _say(f"[train] resumed from step {start}")

    recent, t_last = [], time.perf_counter()
    for r in train_steps(cfg, engine, data, rank=rank, world=world, start=start):
        recent.append(r.loss)
        if rank == 0:
            dt, t_last = time.perf_counter() - t_last, time.perf_counter()
            _say(
                f"[train] stage {cfg.stage} step {r.step}/{r.total} epoch {r.epoch}/{r.epochs} phase {r.phase} "
                f"loss {r.loss:.4f} items/s {r.items * world / max(dt, 1e-9):.1f}"
            )
        last = r.step == r.total
        if r.step % cfg.checkpoint_every and not last:
            continue
        metrics = {"step": r.step, "epoch": r.epoch, "loss": float(np.mean(recent)), "world_size": world, "resumed_from": start}
        report_checkpoint(cfg, engine, metrics, loop_config, data=data, rank=rank, world=world, last=last, device=device)
        recent = []


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.train_dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
    }


def report_checkpoint(cfg: TrainConfig, engine: Any, metrics: dict[str, Any], loop_config: dict[str, Any], *, data: TrainData, rank: int, world: int,
                      last: bool, device: Any) -> None:
    """Save the DeepSpeed state (every rank) and report it as one checkpoint; at the last step rank 0 also
    exports the router directory into it, then checks it against the untrained router and fits the decision layer."""
    import deepspeed
    import ray
    import ray.train

    from icl_router.model.router_dir import RouterMeta, save_router_dir

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        gather = (
            deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
            if cfg.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if rank == 0:
                (Path(d) / STATE_FILE).write_text(json.dumps({"step": metrics["step"]}))
                if last:
                    meta = RouterMeta(**loop_config["meta"], extra={"steps": metrics["step"], "final_loss": metrics["loss"]})
                    pool = dict(zip(data.models, data.profiles))
                    save_router_dir(engine.module, Path(d) / ROUTER_SUBDIR, meta=meta, pool=pool)
        if last and rank == 0:  # after the gather: the other ranks wait at the report, not inside a collective
            kept = {}
            if cfg.stage == 2 and loop_config.get("rs_ref") is not None:
                rs, val = ray.get(loop_config["rs_ref"])
                if len(val):
                    kept = keep_and_fit_decision(cfg, Path(d) / ROUTER_SUBDIR, rs=rs, val=val, data=data, init_dir=loop_config["init_dir"],
                                                 device=device, untrained_to=Path(d) / UNTRAINED_SUBDIR, steps=metrics["step"], world=world)
            (Path(d) / KEPT_FILE).write_text(json.dumps(kept))
        # one name on every rank, so the ranks' DeepSpeed shards land in one checkpoint folder
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint-step-{metrics['step']:08d}")


def prepare_data(cfg: TrainConfig) -> tuple[TrainData, dict[str, Any], Any, np.ndarray]:
    """(the workers' training data, router meta fields, the routing set, held-out rows [V]) from the
    dataset and the named split; stage 2 holds ``val_fraction`` of its train queries out of training."""
    from icl_router.data.routing_set import load_routing_set

    rs = load_routing_set(cfg.dataset, split=cfg.split, embedder=cfg.embedder, models=cfg.models)
    if not rs.anchor_ids:
        raise DatasetError(f"{cfg.dataset} has no anchors.parquet; run `icl-router anchors` first")
    try:
        data, val = build_train_data(rs, stage=cfg.stage, val_fraction=cfg.val_fraction if cfg.stage == 2 else 0.0, seed=cfg.seed)
    except DatasetError as e:
        raise DatasetError(f"{cfg.dataset}, split {cfg.split.name!r}: {e}") from None
    meta = {
        "embedder": cfg.embedder,
        "embedding_dim": int(rs.embeddings.shape[1]),
        "query_input": cfg.router.query_input,
        "profile_layout": cfg.router.profile_layout,
        "anchor_evidence": cfg.router.anchor_evidence,
        "anchor_query_ids": rs.anchor_ids,
        "stage": cfg.stage,
    }
    return data, meta, rs, val


def keep_and_fit_decision(cfg: TrainConfig, router_dir: Path, *, rs: Any, val: np.ndarray, data: TrainData, init_dir: str | Path | None,
                          device: Any = "cpu", untrained_to: Path | None = None, steps: int = 0, world: int = 1) -> dict[str, Any]:
    """Check the trained router against the untrained one on the held-out queries and keep the trained
    one only when it routes them better by more than one standard error (``earliest_within_se``: the
    untrained router's LM is silent); then fit the decision layer on every held-out train query
    (``train.held_out``: the queries the kept router trained on, after ``steps`` steps of ``world``
    workers, are scored by fold routers), and write it into the kept router's directory: ``router_dir``, or
    ``untrained_to`` (default: ``router_dir``, replaced) when the untrained one is kept, so the trained
    export can stay as it was. Runs in the rank-0 worker, both routers on its ``device`` in the
    training dtype (the driver never loads a router LM). ``out["dir"]``: the kept directory."""
    from dataclasses import asdict

    from icl_router.evaluation.baselines import earliest_within_se, routed_hits
    from icl_router.model.device import DTYPES
    from icl_router.model.router_dir import load_router_dir, save_router_dir, write_decision
    from icl_router.routing.scorer import Scorer
    from icl_router.train.held_out import fit_decision_on_held_out, fold_trainer, query_texts, rows_trained
    from icl_router.train.loop import build_router

    loaded = load_router_dir(router_dir, device=device, dtype=DTYPES[cfg.train_dtype])
    fresh = build_router(cfg, anchor_emb=data.anchor_emb, init_dir=str(init_dir) if init_dir else None, device=device).eval()
    labels = rs.labels[:, [rs.models.index(m) for m in data.models]]
    pool = dict(zip(data.models, data.profiles))

    def val_hits(router: Any) -> np.ndarray:
        qe = rs.embeddings[val] if router.layout.query_input == "vector" else None
        texts = query_texts(router, rs, val, max_text_tokens=cfg.max_text_tokens)
        return routed_hits(Scorer(router, pool).score(texts, query_emb=qe), labels[val])

    hits = [val_hits(fresh), val_hits(loaded.router)]  # simplest first
    fresh_acc, trained_acc = (100 * float(np.nanmean(h)) for h in hits)
    keep_trained = earliest_within_se(hits) == 1
    router = loaded.router if keep_trained else fresh
    if not keep_trained:
        meta = loaded.meta
        meta.extra = {**meta.extra, "kept": "untrained", "trained_val_acc": round(trained_acc, 2)}
        router_dir = untrained_to or router_dir
        save_router_dir(fresh, router_dir, meta=meta, pool=loaded.pool)
    out = {"kept": "trained" if keep_trained else "untrained", "val_acc": {"trained": round(trained_acc, 2), "untrained": round(fresh_acc, 2)},
           "dir": str(router_dir)}
    if cfg.decision is None:
        return out
    fitted = fit_decision_on_held_out(
        router, rs, cols=[rs.models.index(m) for m in data.models], decision=cfg.decision, max_text_tokens=cfg.max_text_tokens, seed=cfg.seed,
        trained_on=rows_trained(cfg, data, steps=steps, world=world) if keep_trained else None,
        # a fold router trains in this worker alone: ``world`` of its steps see the batches one step of the job saw
        fold_router=fold_trainer(cfg, data, steps=steps * world, init_dir=str(init_dir) if init_dir else None, device=device) if keep_trained else None,
    )
    write_decision(router_dir, fitted.params.to_json())
    _say(f"[train] kept the {out['kept']} router (held-out accuracy {trained_acc:.1f} trained, {fresh_acc:.1f} untrained); "
         f"decision layer fitted on {fitted.rows} queries ({fitted.by_folds} scored by {fitted.folds} fold routers): {asdict(fitted.params)}")
    return {**out, **fitted.summary(), "decision": fitted.params.to_json()}


def build_tiny_init(cfg: TrainStepsConfig, texts: list[str], path: Path) -> Path:
    """Save a fresh tiny Qwen2 + tokenizer trained on the dataset's texts (the CPU router)."""
    lm, tok = cfg.router.tiny.build(texts, seed=cfg.seed)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    from icl_router.raycluster import ensure_ray

    t0 = time.time()
    # workers run in their own working directory: a relative local path would be read as a hub id there
    cfg = cfg.model_copy(update={"init_from": _absolute_if_local(cfg.init_from),
                                 "router": cfg.router.model_copy(update={"name_or_path": _absolute_if_local(cfg.router.name_or_path)})})
    output = Path(cfg.output).resolve()
    storage = Path(cfg.storage_path or f"{output}.runs").resolve()
    run_name = f"stage{cfg.stage}"
    data, meta, rs, val = prepare_data(cfg)
    init_dir = prepare_init(cfg, data, meta, storage / run_name)
    ensure_ray(cfg.ray)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data_ref": ray.put(data), "init_dir": str(init_dir) if init_dir else None, "meta": meta,
                           "rs_ref": ray.put((rs, val)) if cfg.stage == 2 else None},
        scaling_config=RayScaling(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    kept = publish_router(result.checkpoint, output, dataset=cfg.dataset, anchor_ids=meta["anchor_query_ids"])
    summary = {
        "stage": cfg.stage,
        "output": str(output),
        "steps": result.metrics.get("step"),
        "final_loss": result.metrics.get("loss"),
        "items": int(len(data.items)),
        "workers": cfg.scaling.num_workers,
        "zero_stage": cfg.deepspeed.zero_stage,
        "seconds": round(time.time() - t0, 1),
        "checkpoint": result.checkpoint.path,
        "resumed_from": result.metrics.get("resumed_from"),
        **kept,
    }
    print(f"[train] stage {cfg.stage} done: {summary['steps']} steps, loss {summary['final_loss']:.4f}, router at {output}", flush=True)
    return summary


def prepare_init(cfg: TrainConfig, data: TrainData, meta: dict[str, Any], run_dir: Path) -> Path | None:
    """The tiny initial LM in ``run_dir`` when no router is given (kept by a resumed run), and the prompt
    layout's token ids in ``meta``; the initial directory, or None when the workers load a given router."""
    init_dir = None
    if cfg.init_from is None and cfg.router.name_or_path is None:
        init_dir = run_dir / INIT_DIR
        if not (init_dir / "config.json").exists():  # a resumed run keeps its initial weights
            build_tiny_init(cfg, data.texts, init_dir)
    tok_src = cfg.init_from or cfg.router.name_or_path or init_dir
    tokenizer = _load_tokenizer(tok_src)
    layout = cfg.router.layout(tokenizer)
    meta.update(placeholder_id=layout.placeholder_id, yes_id=layout.yes_id, no_id=layout.no_id)
    return init_dir


def publish_router(checkpoint: Any, output: Path, *, dataset: str, anchor_ids: list[str]) -> dict[str, Any]:
    """Copy the kept router of the last checkpoint (the export, or the untrained router beside it) to
    ``output`` whole, with its anchor queries; what the keep-check decided."""
    from icl_router.model.router_dir import anchor_queries, write_anchor_queries

    kept = {}
    with checkpoint.as_directory() as d:
        exported = Path(d) / ROUTER_SUBDIR
        if not exported.is_dir():
            raise RuntimeError(f"the last checkpoint {checkpoint.path} holds no exported router")
        if (Path(d) / KEPT_FILE).is_file():
            kept = json.loads((Path(d) / KEPT_FILE).read_text())
        if kept.pop("dir", None) and kept.get("kept") == "untrained":  # the keep-check kept the untrained router, beside the export
            exported = Path(d) / UNTRAINED_SUBDIR
        staging = output.with_name(f".{output.name}.staging-{uuid.uuid4().hex[:8]}")
        shutil.copytree(exported, staging)
        try:
            # the anchor queries with gold and grader: a service profiles new models on them (after the
            # decision step, which may rewrite the directory whole)
            write_anchor_queries(staging, anchor_queries(dataset, anchor_ids))
            swap_into_place(staging, output)  # output always holds a whole router, the old or the new
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return kept


def _absolute_if_local(path: str | None) -> str | None:
    """An existing local path made absolute; a hub id (or None) as given."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _load_tokenizer(src: str | Path) -> Any:
    from transformers import AutoTokenizer

    from icl_router.model.vocab import add_prompt_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    add_prompt_tokens(tokenizer)  # the ids the workers get from load_router_lm (which also grows the LM)
    return tokenizer
