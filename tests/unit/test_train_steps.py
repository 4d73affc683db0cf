"""Training steps: shared-prefix loss and gradients equal per-pair; both stages overfit a tiny pool."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.model.tiny import build_tiny_router_lm
from icl_router.testing import SAMPLE_QUERIES as QUERIES
from icl_router.train.steps import (
    batches_by_model,
    collate_stage1,
    collate_stage2,
    param_groups,
    stage1_loss,
    stage2_loss,
    train_step,
)

MODES = [(q, p) for q in ("text", "vector") for p in ("pairs", "fused")]
E, K, T = 24, 6, 3
N_QUERIES = len(QUERIES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices on a shared 2-core machine: a second OpenMP thread only adds contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_router_lm(QUERIES * 4, vocab_size=600)


def make_router(tiny, query_input="text", profile_layout="pairs"):
    lm, tok = tiny
    torch.manual_seed(0)
    return ICLRouter(copy.deepcopy(lm), PromptLayout(tok, query_input=query_input, profile_layout=profile_layout), anchor_emb=torch.randn(K, E))


def pool_batch(router, *, n_models=T, n_queries=N_QUERIES, seed=0):
    """Every query against every model of a random pool, random labels."""
    g = torch.Generator().manual_seed(seed)
    queries = QUERIES[:n_queries]
    profiles = torch.rand(n_models, K, generator=g) < 0.5
    q_emb = torch.randn(n_queries, E, generator=g)
    target = (torch.rand(n_models * n_queries, generator=g) < 0.5).float()
    return collate_stage2(
        router.layout,
        queries * n_models,
        model_idx=[t for t in range(n_models) for _ in queries],
        profiles=profiles,
        target=target,
        query_emb=q_emb.repeat(n_models, 1),
    )


def loss_and_grads(router, batch, forward):
    router.zero_grad(set_to_none=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(batch.pairs), batch.target)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in router.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("query_input,profile_layout", MODES)
def test_shared_prefix_loss_and_grads_equal_per_pair(tiny, query_input, profile_layout):
    router = make_router(tiny, query_input, profile_layout)
    batch = pool_batch(router)
    # pairs of one model need not be contiguous
    perm = torch.randperm(len(batch.target), generator=torch.Generator().manual_seed(1))
    p = batch.pairs
    p.model_idx, p.suffix_ids, p.suffix_len, p.query_emb = p.model_idx[perm], p.suffix_ids[perm], p.suffix_len[perm], p.query_emb[perm]
    batch.target = batch.target[perm]
    naive, g_naive = loss_and_grads(router, batch, router.forward_pairs)
    n_params = sum(1 for _ in router.parameters())
    assert len(g_naive) == n_params  # every parameter, projector and LM, gets a gradient
    for forward in (router.forward_shared, router._forward_packed):
        loss, grads = loss_and_grads(router, batch, forward)
        assert abs(loss - naive) < 1e-5
        assert grads.keys() == g_naive.keys()
        worst = max((grads[n] - g_naive[n]).abs().max().item() for n in grads)
        assert worst < 1e-5, worst
    assert abs(stage2_loss(router, batch).item() - naive) < 1e-5


def test_gradient_checkpointing_switches_to_packed_and_stays_exact(tiny):
    router = make_router(tiny)
    batch = pool_batch(router, seed=3)
    naive, g_naive = loss_and_grads(router, batch, router.forward_pairs)
    router.lm.gradient_checkpointing_enable()
    router.train()
    loss, grads = loss_and_grads(router, batch, router.forward_shared)
    assert abs(loss - naive) < 1e-5
    assert max((grads[n] - g_naive[n]).abs().max().item() for n in grads) < 1e-5


def test_batches_by_model_groups_pairs():
    model_idx = np.repeat([0, 1, 2, 3], [10, 7, 3, 12])
    for per in (1, 2):
        batches = batches_by_model(model_idx, batch_size=4, models_per_batch=per, seed=0)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(len(model_idx)))  # each pair exactly once
        assert all(len(b) <= 4 and len(set(model_idx[b])) <= per for b in batches)
    assert any(len(set(model_idx[b])) == 2 for b in batches_by_model(model_idx, batch_size=4, models_per_batch=2))


def test_stage1_labels_are_the_query_tokens(tiny):
    router = make_router(tiny)
    batch = collate_stage1(router.layout, QUERIES[:3], query_emb=torch.randn(3, E))
    tok = router.layout.tokenizer
    for i, q in enumerate(QUERIES[:3]):
        target = batch.labels[i][batch.labels[i] != -100]
        assert tok.decode(target) == q + tok.eos_token
        assert int((batch.ids[i] == router.placeholder_id).sum()) == 1


def test_stage1_overfits_a_handful_of_queries(tiny):
    router = make_router(tiny)
    batch = collate_stage1(router.layout, QUERIES[:4], query_emb=torch.randn(4, E, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam(param_groups(router, projector_lr=3e-3, lm_lr=3e-3))
    first = stage1_loss(router, batch).item()
    losses = []
    for _ in range(150):  # typically < 60 steps
        losses.append(train_step(router, batch, opt, loss_fn=stage1_loss))
        if losses[-1] < 0.3:
            break
    assert losses[-1] < 0.3, f"stage-1 loss {first:.2f} -> {losses[-1]:.2f} after {len(losses)} steps"


@pytest.mark.parametrize("query_input,profile_layout", [("text", "pairs"), ("vector", "fused")])
def test_stage2_overfits_a_tiny_pool(tiny, query_input, profile_layout):
    router = make_router(tiny, query_input, profile_layout)
    batch = pool_batch(router, n_models=2, n_queries=4)  # the two models differ on some queries
    assert (batch.target[:4] != batch.target[4:]).any()
    opt = torch.optim.Adam(router.parameters(), lr=1e-3)
    for step in range(300):  # typically 50-150 steps
        loss = train_step(router, batch, opt)
        if step % 10 == 9:
            with torch.no_grad():
                acc = ((router.forward_shared(batch.pairs) > 0).float() == batch.target).float().mean().item()
            if acc == 1.0 and loss < 0.1:
                break
    assert acc == 1.0 and loss < 0.1, f"after {step + 1} steps: accuracy {acc:.2f}, loss {loss:.3f}"


def test_param_groups_freeze_the_lm_for_projector_only_training(tiny):
    router = make_router(tiny)
    groups = param_groups(router, projector_lr=2e-5, lm_lr=0)
    assert len(groups) == 1 and not any(p.requires_grad for p in router.lm.parameters())
    groups = param_groups(router, projector_lr=1e-5, lm_lr=2e-6)
    assert [g["lr"] for g in groups] == [1e-5, 2e-6] and all(p.requires_grad for p in router.lm.parameters())
