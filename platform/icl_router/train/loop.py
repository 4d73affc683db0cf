"""The training schedule and loop, plain PyTorch (no Ray, no DeepSpeed).

``train_steps`` walks a schedule fixed by the seed (epochs of batches, sharded by
rank) and yields after every optimiser step; it drives any engine with
``backward(loss)``, ``step()``, ``module`` and ``optimizer``: the DeepSpeed engine
in Ray Train workers (``driver.py``) or ``PlainEngine`` in one process
(evaluation sweeps, tests). ``make_optimizer`` is the one optimiser builder;
``enter_phase`` sets each part's learning rate per phase and turns off the
gradients of a part whose rate is 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl_router.config import PhaseConfig, TrainStepsConfig
from icl_router.train.data import TrainData

# ---------------------------------------------------------------------------
# The schedule: which items each rank trains on at each global step.


def epoch_batches(cfg: TrainStepsConfig, data: TrainData, *, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's batches of one epoch (indices into ``data.items``); every rank gets the same count."""
    from icl_router.train.steps import batches_by_model

    seed = cfg.seed * 100_003 + epoch
    items = data.items
    if cfg.stage == 2:
        batches = batches_by_model(items[:, 1], batch_size=cfg.batch_size, seed=seed)
    else:
        perm = np.random.default_rng(seed).permutation(len(items))
        batches = [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def total_steps(cfg: TrainStepsConfig, data: TrainData, *, world: int) -> tuple[int, list[tuple[int, int]]]:
    """(total steps, [(phase, epoch)] per epoch)."""
    epochs = [(p, e) for p, ph in enumerate(cfg.phases) for e in range(ph.epochs)]
    n = sum(len(epoch_batches(cfg, data, epoch=i, rank=0, world=world)) for i in range(len(epochs)))
    return (min(n, cfg.max_steps) if cfg.max_steps else n), epochs


# ---------------------------------------------------------------------------
# Building the router in a worker


def build_router(cfg: TrainStepsConfig, *, anchor_emb: np.ndarray, init_dir: str | None, device: torch.device | str = "cpu") -> Any:
    """The ICLRouter to train, on ``device`` in the config's training dtype (the device rule,
    ``TrainStepsConfig.train_dtype``): from ``init_from`` (a router directory), a hub id / path, or the tiny LM."""
    from icl_router.model.device import DTYPES
    from icl_router.model.tiny import load_router_lm

    dtype = DTYPES[cfg.train_dtype]
    torch.manual_seed(cfg.seed)  # the same fresh projector on every rank
    projector_state = None
    if cfg.init_from:
        from icl_router.model.router_dir import load_router_dir

        prev = load_router_dir(cfg.init_from, dtype=dtype).router
        lm, tokenizer, projector_state = prev.lm, prev.layout.tokenizer, prev.projector.state_dict()
    else:
        lm, tokenizer = load_router_lm(cfg.router.name_or_path or init_dir, dtype=dtype)
    router = cfg.router.build(lm, tokenizer, anchor_emb=torch.tensor(anchor_emb))
    if projector_state is not None:
        router.projector.load_state_dict(projector_state)
    return router.to(device=device, dtype=dtype)


def truncate_texts(texts: list[str], tokenizer: Any, *, max_tokens: int) -> list[str]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids)]


# ---------------------------------------------------------------------------
# The worker loop


def make_batch(cfg: TrainStepsConfig, router: Any, data: TrainData, texts: list[str], idx: np.ndarray) -> Any:
    from icl_router.train.steps import collate_stage1, collate_stage2

    items = data.items[idx]  # [B, 3]
    rows = items[:, 0]
    q_emb = torch.as_tensor(data.embeddings[rows])
    if cfg.stage == 1:
        return collate_stage1(router.layout, [texts[r] for r in rows], query_emb=q_emb)
    return collate_stage2(
        router.layout,
        [texts[r] for r in rows],
        model_idx=items[:, 1],
        profiles=torch.tensor(data.profiles),
        target=items[:, 2].astype(np.float32),
        query_emb=q_emb if cfg.router.query_input == "vector" else None,
    )


def param_parts(router: Any) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The two parts a phase gives a learning rate: (projector + anchor-evidence head, router LM)."""
    head = list(router.evidence.parameters()) if router.evidence is not None else []
    parts = list(router.projector.parameters()) + head, list(router.lm.parameters())
    covered = {id(p) for part in parts for p in part}
    stray = [n for n, p in router.named_parameters() if id(p) not in covered]
    if stray:  # a new submodule must join a part, or a phase could never train or freeze it
        raise ValueError(f"router parameters in neither optimiser part: {stray}")
    return parts


def make_optimizer(router: Any, cfg: TrainStepsConfig) -> torch.optim.Optimizer:
    """The one optimiser builder: AdamW with the two ``param_parts`` as groups (projector + head,
    then LM), at the first phase's rates; ``enter_phase`` moves them per phase.

    Every part is in the optimiser even when the first phase freezes it: DeepSpeed ZeRO builds
    its flat partitions from the parameters that require gradients at ``deepspeed.initialize``,
    so a part frozen then could never train in a later phase.
    """
    first = cfg.phases[0]
    projector, lm = param_parts(router)
    return torch.optim.AdamW(
        [{"params": projector, "lr": first.lr_projector}, {"params": lm, "lr": first.lr_router}],
        weight_decay=cfg.deepspeed.weight_decay,
    )


def enter_phase(engine: Any, phase: PhaseConfig) -> None:
    """Set each part's learning rate; a part at rate 0 computes no gradients this phase."""
    for params, group, lr in zip(param_parts(engine.module), engine.optimizer.param_groups, (phase.lr_projector, phase.lr_router)):
        group["lr"] = lr
        for p in params:
            p.requires_grad_(lr > 0)


class PlainEngine:
    """The slice of DeepSpeed's engine API the loop uses, for one process without DeepSpeed."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, clip: float) -> None:
        self.module, self.optimizer, self.clip = module, optimizer, clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class StepResult:
    step: int  # global step, 1-based
    total: int
    epoch: int  # 1-based
    epochs: int
    phase: int  # 1-based
    loss: float
    items: int  # items in this rank's batch


def train_steps(cfg: TrainStepsConfig, engine: Any, data: TrainData, *, rank: int = 0, world: int = 1, start: int = 0) -> Iterator[StepResult]:
    """Run the schedule from global step ``start``; yield after each optimiser step.

    Steps before ``start`` are skipped without computing anything, so a run resumed
    from a checkpoint sees exactly the batches the uninterrupted run would have.
    """
    from icl_router.train.steps import stage1_loss, stage2_loss

    router = engine.module
    texts = truncate_texts(data.texts, router.layout.tokenizer, max_tokens=cfg.max_text_tokens)
    n_total, epochs = total_steps(cfg, data, world=world)
    loss_fn = stage2_loss if cfg.stage == 2 else stage1_loss
    router.train()
    step = 0
    for e, (phase_i, _) in enumerate(epochs):
        batches = epoch_batches(cfg, data, epoch=e, rank=rank, world=world)
        enter_phase(engine, cfg.phases[phase_i])
        for idx in batches:
            if step >= n_total:
                return
            step += 1
            if step <= start:
                continue
            loss = loss_fn(router, make_batch(cfg, router, data, texts, idx))
            engine.backward(loss)
            engine.step()
            yield StepResult(step, n_total, e + 1, len(epochs), phase_i + 1, float(loss.detach()), len(idx))
