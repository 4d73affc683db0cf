"""Training steps: shared-prefix loss and gradients equal per-pair; both stages overfit a tiny pool;
the one optimiser builder and the per-phase freezing of a part at learning rate 0."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from icl_router.config import PhaseConfig, TrainStepsConfig
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.testing import SAMPLE_QUERIES as QUERIES
from icl_router.train.data import TrainData
from icl_router.train.loop import PlainEngine, make_optimizer, param_parts, train_steps
from icl_router.train.steps import (
    batches_by_model,
    collate_stage1,
    collate_stage2,
    stage1_loss,
    stage2_loss,
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
def tiny(tiny_router_lm):
    return tiny_router_lm


def make_router(tiny, query_input="text", profile_layout="pairs", anchor_evidence=False):
    lm, tok = tiny
    torch.manual_seed(0)
    # a copy in train mode: these tests train it, and the shared LM must stay as it is
    layout = PromptLayout(tok, query_input=query_input, profile_layout=profile_layout)
    return ICLRouter(copy.deepcopy(lm), layout, anchor_emb=torch.randn(K, E), anchor_evidence=anchor_evidence).train()


def train_config(*phases, stage=2, **kw):
    """The steps of an in-process training; ``phases``: (lr_projector, lr_router[, epochs]) tuples."""
    return TrainStepsConfig(
        stage=stage,
        phases=[PhaseConfig(lr_projector=p[0], lr_router=p[1], epochs=p[2] if len(p) > 2 else 1) for p in phases],
        **kw,
    )


def step_fn(router, engine, loss_fn=stage2_loss):
    """One optimiser step of the training loop's engine on a batch -> the loss."""

    def step(batch):
        loss = loss_fn(router, batch)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    return step


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
    step = step_fn(router, PlainEngine(router, make_optimizer(router, train_config((3e-3, 3e-3), stage=1)), clip=0.0), stage1_loss)
    first = stage1_loss(router, batch).item()
    losses = []
    for _ in range(150):  # typically < 60 steps
        losses.append(step(batch))
        if losses[-1] < 0.3:
            break
    assert losses[-1] < 0.3, f"stage-1 loss {first:.2f} -> {losses[-1]:.2f} after {len(losses)} steps"


@pytest.mark.parametrize("query_input,profile_layout", [("text", "pairs"), ("vector", "fused")])
def test_stage2_overfits_a_tiny_pool(tiny, query_input, profile_layout):
    router = make_router(tiny, query_input, profile_layout)
    batch = pool_batch(router, n_models=2, n_queries=4)  # the two models differ on some queries
    assert (batch.target[:4] != batch.target[4:]).any()
    one_step = step_fn(router, PlainEngine(router, make_optimizer(router, train_config((1e-3, 1e-3))), clip=0.0))
    for step in range(300):  # typically 50-150 steps
        loss = one_step(batch)
        if step % 10 == 9:
            with torch.no_grad():
                wrong = int(((router.forward_shared(batch.pairs) > 0) != batch.target.bool()).sum())
            if wrong == 0 and loss < 0.1:
                break
    assert wrong == 0 and loss < 0.1, f"after {step + 1} steps: {wrong} pairs wrong, loss {loss:.3f}"


def test_the_optimiser_holds_projector_and_evidence_head_then_the_lm(tiny):
    router = make_router(tiny, "vector", anchor_evidence=True)
    opt = make_optimizer(router, train_config((1e-3, 2e-4)))
    groups = [{id(p) for p in g["params"]} for g in opt.param_groups]
    want = [{id(p) for p in [*router.projector.parameters(), *router.evidence.parameters()]}, {id(p) for p in router.lm.parameters()}]
    assert groups == want and [g["lr"] for g in opt.param_groups] == [1e-3, 2e-4]
    assert set().union(*groups) == {id(p) for p in router.parameters()}  # every parameter, once
    router.extra = torch.nn.Linear(2, 2)  # a submodule in neither part is refused, not left untrained
    with pytest.raises(ValueError, match="extra"):
        param_parts(router)


class RecordingEngine(PlainEngine):
    """PlainEngine that records, after each backward, which parameters received a gradient."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.with_grad = []

    def backward(self, loss):
        super().backward(loss)
        self.with_grad.append({n for n, p in self.module.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("frozen", ["lm", "projector"])
def test_a_part_at_rate_zero_computes_no_gradient_in_its_phase(tiny, frozen):
    router = make_router(tiny, "vector", anchor_evidence=True)
    n_models, g = 2, torch.Generator().manual_seed(0)
    data = TrainData(
        items=np.array([[q, m, int(torch.rand(1, generator=g) < 0.5)] for q in range(N_QUERIES) for m in range(n_models)]),
        texts=QUERIES,
        embeddings=torch.randn(N_QUERIES, E, generator=g).numpy(),
        anchor_emb=router.anchor_emb.numpy(),
        profiles=(torch.rand(n_models, K, generator=g) < 0.5).numpy(),
        models=["m0", "m1"],
    )
    lr = 1e-2
    first = (0.0, lr) if frozen == "projector" else (lr, 0.0)
    cfg = train_config((*first, 2), (lr, lr, 1), batch_size=4)
    engine = RecordingEngine(router, make_optimizer(router, cfg), clip=1.0)
    lm_names = {n for n, _ in router.named_parameters() if n.startswith("lm.")}
    head_names = {n for n, _ in router.named_parameters() if n.startswith(("projector.", "evidence."))}
    assert lm_names and head_names and lm_names | head_names == {n for n, _ in router.named_parameters()}
    frozen_names = lm_names if frozen == "lm" else head_names
    before = {n: p.detach().clone() for n, p in router.named_parameters()}
    phases = []
    for r in train_steps(cfg, engine, data):
        phases.append(r.phase)
        if r.phase == 1:  # the frozen part never moved: no gradient, so no AdamW step either
            assert all(torch.equal(p, before[n]) for n, p in router.named_parameters() if n in frozen_names)
    assert phases.count(1) >= 2 and phases.count(2) >= 1
    for phase, seen in zip(phases, engine.with_grad):
        assert seen == (lm_names | head_names) - (frozen_names if phase == 1 else set()), (phase, frozen)
    # in phase 2 the frozen part trains: its weights moved by more than float noise
    assert max((p - before[n]).abs().max().item() for n, p in router.named_parameters() if n in frozen_names) > 1e-6
