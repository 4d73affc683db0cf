"""Both training stages on Ray Train: a TorchTrainer whose workers run DeepSpeed.

The driver reads the dataset into a RoutingSet, prepares the initial router (a
tiny one is built here; a hub id or a previous stage's directory is loaded by
each worker) and starts ``TorchTrainer(train_loop, ...)``. Every worker calls
``deepspeed.initialize`` on the ICLRouter with a torch AdamW (projector and LM
in two parameter groups whose learning rates follow the configured phases),
runs the pure steps of ``icl_router.train.steps`` on its shard of a schedule
that is fixed by the seed, and reports a checkpoint every ``checkpoint_every``
steps. After a worker dies, Ray Train restarts the group (``FailureConfig``),
the workers load the latest checkpoint and continue at its step, so the run
ends at the same step with the same batches. The last checkpoint also holds the
exported router directory, which the driver copies to ``output``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from icl_router.config import TrainConfig

log = logging.getLogger("icl_router.train")

INIT_DIR = "init-lm"
STATE_FILE = "train_state.json"
DS_TAG = "ds"
ROUTER_SUBDIR = "router"


# ---------------------------------------------------------------------------
# The schedule: which items each rank trains on at each global step.


def epoch_batches(cfg: TrainConfig, data: dict[str, Any], *, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's batches of one epoch (indices into ``data['items']``); every rank gets the same count."""
    from icl_router.train.steps import batches_by_model

    seed = cfg.seed * 100_003 + epoch
    items = data["items"]
    if cfg.stage == 2:
        batches = batches_by_model(items[:, 1], batch_size=cfg.batch_size, seed=seed)
    else:
        perm = np.random.default_rng(seed).permutation(len(items))
        batches = [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def total_steps(cfg: TrainConfig, data: dict[str, Any], *, world: int) -> tuple[int, list[tuple[int, int]]]:
    """(total steps, [(phase, epoch)] per epoch)."""
    epochs = [(p, e) for p, ph in enumerate(cfg.phases) for e in range(ph.epochs)]
    n = sum(len(epoch_batches(cfg, data, epoch=i, rank=0, world=world)) for i in range(len(epochs)))
    return (min(n, cfg.max_steps) if cfg.max_steps else n), epochs


# ---------------------------------------------------------------------------
# Building the router in a worker


def build_router(cfg: TrainConfig, *, anchor_emb: np.ndarray, init_dir: str | None) -> Any:
    """The ICLRouter to train: from ``init_from`` (a router directory), a hub id / path, or the tiny LM."""
    import torch

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.tiny import load_router_lm

    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    torch.manual_seed(cfg.seed)  # the same fresh projector on every rank
    projector_state = None
    if cfg.init_from:
        from icl_router.model.router_dir import load_router_dir

        prev = load_router_dir(cfg.init_from, dtype=dtype).router
        lm, tokenizer, projector_state = prev.lm, prev.layout.tokenizer, prev.projector.state_dict()
    else:
        lm, tokenizer = load_router_lm(cfg.router.name_or_path or init_dir, dtype=dtype)
    layout = PromptLayout(tokenizer, query_input=cfg.router.query_input, profile_layout=cfg.router.profile_layout)
    router = ICLRouter(lm, layout, anchor_emb=torch.as_tensor(anchor_emb))
    if projector_state is not None:
        router.projector.load_state_dict(projector_state)
    return router.to(dtype)


def truncate_texts(texts: list[str], tokenizer: Any, *, max_tokens: int) -> list[str]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids)]


# ---------------------------------------------------------------------------
# The worker loop


def _say(line: str) -> None:
    # not print(): Ray Train patches it to log each line a second time
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _set_lrs(engine: Any, phase: Any) -> None:
    for group, lr in zip(engine.optimizer.param_groups, (phase.lr_projector, phase.lr_router)):
        group["lr"] = lr


def _make_batch(cfg: TrainConfig, router: Any, data: dict[str, Any], texts: list[str], idx: np.ndarray) -> Any:
    import torch

    from icl_router.train.steps import collate_stage1, collate_stage2

    items = data["items"][idx]
    rows = items[:, 0] if cfg.stage == 2 else items
    q_emb = torch.as_tensor(data["embeddings"][rows])
    if cfg.stage == 1:
        return collate_stage1(router.layout, [texts[r] for r in rows], query_emb=q_emb)
    return collate_stage2(
        router.layout,
        [texts[r] for r in rows],
        model_idx=items[:, 1],
        profiles=torch.as_tensor(data["profiles"]),
        target=items[:, 2].astype(np.float32),
        query_emb=q_emb if cfg.router.query_input == "vector" else None,
    )


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import deepspeed
    import ray
    import ray.train
    import torch

    from icl_router.model.router_dir import RouterMeta, save_router_dir
    from icl_router.train.steps import stage1_loss, stage2_loss

    # The shm-comm op only serves inference all-reduce and needs LOCAL_SIZE, which Ray
    # never sets; turning it off here skips a 30-190 s gcc build (ENVIRONMENT.md).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    data = ray.get(loop_config["data_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    router = build_router(cfg, anchor_emb=data["anchor_emb"], init_dir=loop_config["init_dir"])
    texts = truncate_texts(data["texts"], router.layout.tokenizer, max_tokens=cfg.max_text_tokens)
    first = cfg.phases[0]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(router.projector.parameters()), "lr": first.lr_projector},
            {"params": list(router.lm.parameters()), "lr": first.lr_router},
        ],
        weight_decay=cfg.deepspeed.weight_decay,
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=router, optimizer=optimizer, config=ds_config)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            step = json.loads((Path(d) / STATE_FILE).read_text())["step"]
        if rank == 0:
            _say(f"[train] resumed from step {step}")

    n_total, epochs = total_steps(cfg, data, world=world)
    loss_fn = stage2_loss if cfg.stage == 2 else stage1_loss
    engine.train()
    done, recent, t_last = 0, [], time.perf_counter()
    for e, (phase_i, _) in enumerate(epochs):
        batches = epoch_batches(cfg, data, epoch=e, rank=rank, world=world)
        if done + len(batches) <= step:  # an epoch finished before the resumed checkpoint
            done += len(batches)
            continue
        _set_lrs(engine, cfg.phases[phase_i])
        for b, idx in enumerate(batches):
            if done + b < step:
                continue
            if step >= n_total:
                break
            batch = _make_batch(cfg, router, data, texts, idx)
            loss = loss_fn(engine.module, batch)
            engine.backward(loss)
            engine.step()
            step += 1
            recent.append(float(loss.detach()))
            if rank == 0:
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                _say(
                    f"[train] stage {cfg.stage} step {step}/{n_total} epoch {e + 1}/{len(epochs)} "
                    f"phase {phase_i + 1} loss {recent[-1]:.4f} items/s {len(idx) * world / max(dt, 1e-9):.1f}"
                )
            last = step >= n_total
            if step % cfg.checkpoint_every == 0 or last:
                metrics = {"step": step, "epoch": e + 1, "loss": float(np.mean(recent)), "world_size": world}
                with tempfile.TemporaryDirectory() as d:
                    engine.save_checkpoint(d, tag=DS_TAG)
                    if cfg.deepspeed.zero_stage == 3:
                        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
                    else:
                        gather = contextlib.nullcontext()
                    with gather:
                        if rank == 0:
                            (Path(d) / STATE_FILE).write_text(json.dumps({"step": step}))
                            if last:
                                meta = RouterMeta(**loop_config["meta"], extra={"steps": step, "final_loss": metrics["loss"]})
                                pool = dict(zip(data["models"], data["profiles"]))
                                save_router_dir(engine.module, Path(d) / ROUTER_SUBDIR, meta=meta, pool=pool)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                recent = []
        done += len(batches)
        if step >= n_total:
            break


# ---------------------------------------------------------------------------
# The driver


def prepare_data(cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays for the workers, router meta fields) from the dataset and the named split."""
    from icl_router.data.routing_set import load_routing_set

    rs = load_routing_set(cfg.dataset, split=cfg.split, embedder=cfg.embedder)
    if not rs.anchor_ids:
        raise ValueError(f"{cfg.dataset} has no anchors.parquet; run `icl-router anchors` first")
    items = rs.training_pairs() if cfg.stage == 2 else np.union1d(rs.rows("train"), rs.anchor_rows)
    if len(items) == 0:
        raise ValueError(f"stage {cfg.stage}: the train part of split {cfg.split.name!r} has no usable rows")
    data = {
        "items": items,
        "texts": rs.texts,
        "embeddings": rs.embeddings,
        "anchor_emb": rs.embeddings[rs.anchor_rows],
        "profiles": rs.profiles(),
        "models": rs.models,
    }
    meta = {
        "embedder": cfg.embedder,
        "embedding_dim": int(rs.embeddings.shape[1]),
        "query_input": cfg.router.query_input,
        "profile_layout": cfg.router.profile_layout,
        "anchor_query_ids": rs.anchor_ids,
        "stage": cfg.stage,
    }
    return data, meta


def build_tiny_init(cfg: TrainConfig, texts: list[str], path: Path) -> Path:
    """Save a fresh tiny Qwen2 + tokenizer trained on the dataset's texts (the CPU router)."""
    from icl_router.model.tiny import build_tiny_router_lm

    t = cfg.router.tiny
    lm, tok = build_tiny_router_lm(
        texts,
        vocab_size=t.vocab_size,
        seed=cfg.seed,
        hidden=t.hidden_size,
        heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads,
        layers=t.num_hidden_layers,
        intermediate=t.intermediate_size,
    )
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    from icl_router.model.prompt import PromptLayout
    from icl_router.raycluster import ensure_ray

    t0 = time.time()
    output = Path(cfg.output).resolve()
    storage = Path(cfg.storage_path or f"{output}.runs").resolve()
    run_name = f"stage{cfg.stage}"
    data, meta = prepare_data(cfg)
    init_dir = None
    if cfg.init_from is None and cfg.router.name_or_path is None:
        init_dir = storage / run_name / INIT_DIR
        if not (init_dir / "config.json").exists():  # a resumed run keeps its initial weights
            build_tiny_init(cfg, data["texts"], init_dir)
    tok_src = cfg.init_from or cfg.router.name_or_path or init_dir
    tokenizer = _load_tokenizer(tok_src)
    layout = PromptLayout(tokenizer, query_input=cfg.router.query_input, profile_layout=cfg.router.profile_layout)
    meta.update(placeholder_id=layout.placeholder_id, yes_id=layout.yes_id, no_id=layout.no_id)

    ensure_ray(cfg.ray)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data_ref": ray.put(data), "init_dir": str(init_dir) if init_dir else None, "meta": meta},
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
    with result.checkpoint.as_directory() as d:
        exported = Path(d) / ROUTER_SUBDIR
        if not exported.is_dir():
            raise RuntimeError(f"the last checkpoint {result.checkpoint.path} holds no exported router")
        staging = output.with_name(f".{output.name}.staging-{uuid.uuid4().hex[:8]}")
        shutil.copytree(exported, staging)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    summary = {
        "stage": cfg.stage,
        "output": str(output),
        "steps": result.metrics.get("step"),
        "final_loss": result.metrics.get("loss"),
        "items": int(len(data["items"])),
        "workers": cfg.scaling.num_workers,
        "zero_stage": cfg.deepspeed.zero_stage,
        "seconds": round(time.time() - t0, 1),
        "checkpoint": result.checkpoint.path,
    }
    print(f"[train] stage {cfg.stage} done: {summary['steps']} steps, loss {summary['final_loss']:.4f}, router at {output}", flush=True)
    return summary


def _load_tokenizer(src: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src))
