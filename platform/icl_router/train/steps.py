"""Pure training pieces: batch building and the two stage losses.

Plain PyTorch: the training loop (``train.loop``, run by the Ray Train / DeepSpeed
driver and by evaluation in one process) calls ``stage1_loss`` and ``stage2_loss``
on batches built here; tests and benchmarks call them directly. The optimiser and
the per-phase freezing live in ``train.loop`` (``make_optimizer``, ``enter_phase``).

Stage-2 batches group pairs by model, so each model's profile prefix is
computed once per batch (``ICLRouter.forward_shared``); ``batches_by_model``
makes such groups, ``collate_stage2`` turns one group into tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter, Pairs, pad_ids


@dataclass
class Stage2Batch:
    pairs: Pairs
    target: torch.Tensor  # float [N]: 1 if the model answered the query correctly


@dataclass
class Stage1Batch:
    ids: torch.Tensor  # long [N, L], right-padded
    labels: torch.Tensor  # long [N, L]: the query tokens + eos, -100 elsewhere (unshifted)
    query_emb: torch.Tensor  # float [N, E]


def batches_by_model(model_idx: Sequence[int] | np.ndarray, *, batch_size: int, models_per_batch: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Pair indices cut into batches of ``batch_size`` pairs from ``models_per_batch`` blocks.

    Each block holds ``batch_size // models_per_batch`` pairs of one model (shuffled);
    blocks are shuffled, then taken ``models_per_batch`` at a time, so a batch
    computes at most ``models_per_batch`` prefixes.
    """
    if batch_size < models_per_batch:
        raise ValueError(f"batch_size={batch_size} < models_per_batch={models_per_batch}")
    rng = np.random.default_rng(seed)
    model_idx = np.asarray(model_idx)
    block = batch_size // models_per_batch
    blocks = []
    for m in np.unique(model_idx):
        idx = rng.permutation(np.flatnonzero(model_idx == m))
        blocks += [idx[i : i + block] for i in range(0, len(idx), block)]
    order = rng.permutation(len(blocks))
    return [np.concatenate([blocks[j] for j in order[i : i + models_per_batch]]) for i in range(0, len(order), models_per_batch)]


def collate_stage2(
    layout: PromptLayout,
    texts: Sequence[str],
    *,
    model_idx: Sequence[int],
    profiles: torch.Tensor,
    target: Sequence[float] | torch.Tensor,
    query_emb: torch.Tensor | None = None,
) -> Stage2Batch:
    """One batch of pairs (query ``texts[i]`` x model ``model_idx[i]``) into tensors.

    ``profiles`` is bool [T, K] for the whole pool; only the batch's models are kept.
    ``query_emb`` (float [N, E]) is needed when ``layout.query_input == "vector"``.
    """
    models, local = np.unique(np.asarray(model_idx), return_inverse=True)
    ids, lens = pad_ids([layout.suffix(t).ids for t in texts], layout.tokenizer.pad_token_id or 0)
    pairs = Pairs(
        profiles=profiles[torch.as_tensor(models)].bool(),
        model_idx=torch.as_tensor(local, dtype=torch.long),
        suffix_ids=ids,
        suffix_len=lens,
        query_emb=query_emb,
    )
    return Stage2Batch(pairs, torch.as_tensor(target, dtype=torch.float32))


def collate_stage1(layout: PromptLayout, texts: Sequence[str], *, query_emb: torch.Tensor) -> Stage1Batch:
    """Stage-1 rows: the reconstruction prompt with the query's vector, then its text as the target."""
    segs = [layout.stage1(t) for t in texts]
    ids, _ = pad_ids([s.ids for s, _ in segs], layout.tokenizer.pad_token_id or 0)
    labels, _ = pad_ids([[-100] * n + s.ids[n:] for s, n in segs], 0, fill=-100)
    return Stage1Batch(ids, labels, query_emb)


def stage2_loss(router: ICLRouter, batch: Stage2Batch, *, shared: bool = True) -> torch.Tensor:
    """BCE-with-logits of logit(Yes) - logit(No) against the label; mean over pairs.

    ``shared=True`` runs each model's prefix once (the training path);
    ``shared=False`` the naive per-pair prompts (the reference it must equal).
    """
    d = router.forward_shared(batch.pairs) if shared else router.forward_pairs(batch.pairs)  # [N]
    return functional.binary_cross_entropy_with_logits(d.float(), batch.target.to(d.device))


def stage1_loss(router: ICLRouter, batch: Stage1Batch) -> torch.Tensor:
    """Mean cross-entropy of the query tokens given the query's projected vector."""
    return router.forward_stage1(batch.ids, batch.labels, query_emb=batch.query_emb)
