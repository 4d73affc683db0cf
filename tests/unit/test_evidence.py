"""Anchor evidence: kNN on the profile, added to the router's logit on every path alike."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from icl_router.config import ConfigError, RouterConfig
from icl_router.model.evidence import AnchorEvidence
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.model.router_dir import RouterDirError, RouterMeta, load_router_dir, save_router_dir
from icl_router.routing.scorer import Scorer
from icl_router.testing import SAMPLE_QUERIES, full_forward_p
from icl_router.train.steps import collate_stage2, stage2_loss

E, K, T = 16, 12, 3


@pytest.fixture(scope="module")
def tiny(tiny_router_lm):
    return tiny_router_lm


def make(tiny, *, evidence=True):
    lm, tok = tiny
    torch.manual_seed(3)
    router = ICLRouter(copy.deepcopy(lm), PromptLayout(tok, query_input="vector", profile_layout="pairs"), anchor_emb=torch.randn(K, E), anchor_evidence=evidence)
    if evidence:  # away from the initial weights, so every feature and the bias count
        with torch.no_grad():
            router.evidence.weight.copy_(torch.tensor([0.5, 1.0, -0.3, 0.7]))
            router.evidence.bias.fill_(0.2)
            router.evidence.lm_weight.fill_(0.8)
    profiles = torch.rand(T, K, generator=torch.Generator().manual_seed(0)) < 0.5  # [T, K]
    return router.eval(), profiles


def test_initial_head_is_soft_knn_over_the_anchors():
    g = np.random.default_rng(0)
    q, a = g.standard_normal((4, E)), g.standard_normal((K, E))
    y = g.random((T, K)) < 0.5
    got = AnchorEvidence()(torch.tensor(q), torch.tensor(a), torch.tensor(y)).detach().numpy()  # [T, Q]
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T  # [Q, K]
    w = np.exp(sim / 0.1)
    rate = np.clip((w / w.sum(1, keepdims=True)) @ y.T, 0.02, 0.98)  # [Q, T]
    np.testing.assert_allclose(got, np.log(rate / (1 - rate)).T, atol=1e-5)


def test_a_query_on_an_anchor_reads_that_anchors_outcome():
    head = AnchorEvidence()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([1.0, 0, 0, 0]))  # the sharpest temperature alone
    a = torch.eye(K, E) * 3
    y = torch.zeros(2, K, dtype=torch.bool)
    y[0, 4] = True  # model 0 got anchor 4 right, model 1 did not
    logit = head(a[4:5] * 2, a, y)[:, 0]  # [T]: the query points at anchor 4
    assert logit[0] > 3 and logit[1] < -3


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "packed"])
def test_scorer_with_evidence_equals_full_forward(tiny, shared):
    router, profiles = make(tiny)
    pool = {f"m{t}": profiles[t].numpy() for t in range(T)}
    q_emb = torch.randn(len(SAMPLE_QUERIES), E)
    scorer = Scorer(router, pool, max_rows=4, pack=2)
    scorer.shared_attention = shared
    p = scorer.score(SAMPLE_QUERIES, query_emb=q_emb)
    ref = full_forward_p(router, profiles, q_emb, SAMPLE_QUERIES).numpy()
    assert np.abs(p - ref).max() < 1e-4  # float32: batched and per-pair forwards sum in another order
    plain = copy.deepcopy(router)
    plain.evidence = None
    assert np.abs(p - full_forward_p(plain, profiles, q_emb, SAMPLE_QUERIES).numpy()).max() > 1e-3  # the head counts
    # a subset batches other rows: float32 rounding, not bit-equality
    np.testing.assert_allclose(scorer.score(SAMPLE_QUERIES, query_emb=q_emb, models=["m2", "m0"]), p[:, [2, 0]], atol=1e-6)


def test_training_paths_equal_and_the_head_learns(tiny):
    router, profiles = make(tiny)
    router.train()
    n = len(SAMPLE_QUERIES)
    batch = collate_stage2(
        router.layout, SAMPLE_QUERIES, model_idx=[i % T for i in range(n)], profiles=profiles, target=[float(i % 2) for i in range(n)], query_emb=torch.randn(n, E)
    )
    d_pairs, d_shared = router.forward_pairs(batch.pairs), router.forward_shared(batch.pairs)
    torch.testing.assert_close(d_pairs, d_shared, atol=1e-5, rtol=1e-5)
    stage2_loss(router, batch).backward()
    assert router.evidence.weight.grad is not None and router.evidence.weight.grad.abs().sum() > 0


def test_router_dir_round_trip_and_refusals(tiny, tmp_path):
    router, profiles = make(tiny)
    lay = router.layout
    anchors = [f"a{i}" for i in range(K)]
    meta = RouterMeta("emb", E, "vector", "pairs", lay.placeholder_id, lay.yes_id, lay.no_id, anchors, anchor_evidence=True)
    pool = {f"m{t}": profiles[t].numpy() for t in range(T)}
    path = save_router_dir(router, tmp_path / "router", meta=meta, pool=pool)
    q = np.random.default_rng(1).standard_normal((3, E)).astype(np.float32)
    want = Scorer(router, pool).score(SAMPLE_QUERIES[:3], query_emb=q)
    np.testing.assert_allclose(Scorer.from_dir(path).score(SAMPLE_QUERIES[:3], query_emb=q), want, atol=1e-6)  # float32 rounding

    with pytest.raises(RouterDirError, match="anchor_evidence=False but the router has"):
        save_router_dir(router, tmp_path / "other", meta=RouterMeta(**{**meta.__dict__, "anchor_evidence": False}), pool=pool)
    broken = shutil.copytree(path, tmp_path / "broken")
    raw = json.loads((broken / "icl_router.json").read_text())
    (broken / "icl_router.json").write_text(json.dumps({**raw, "anchor_evidence": False}))
    with pytest.raises(RouterDirError, match="anchor_evidence=False but the file holds the evidence"):
        load_router_dir(broken)


def test_evidence_needs_vector_queries(tiny):
    lm, tok = tiny
    with pytest.raises(ValueError, match="needs query_input='vector'"):
        ICLRouter(lm, PromptLayout(tok, query_input="text", profile_layout="pairs"), anchor_emb=torch.randn(K, E), anchor_evidence=True)
    with pytest.raises((ConfigError, ValueError), match="anchor_evidence reads the query's vector: set query_input: vector"):
        RouterConfig(query_input="text", anchor_evidence=True)


def test_a_fresh_router_is_the_evidence_alone_and_the_scorer_skips_the_silent_lm(tiny):
    """lm_weight starts at 0: the untrained router's p is the evidence head's, on every path."""
    from icl_router.routing.fast import EvidenceScorer
    from icl_router.routing.scorer import Scorer

    lm, tok = tiny
    torch.manual_seed(3)
    router = ICLRouter(copy.deepcopy(lm), PromptLayout(tok, query_input="vector"), anchor_emb=torch.randn(K, E), anchor_evidence=True).eval()
    assert router.evidence.lm_silent
    profiles = torch.rand(2, K, generator=torch.Generator().manual_seed(1)) < 0.5
    pool = {f"m{t}": profiles[t].numpy() for t in range(2)}
    q = torch.randn(4, E)
    full = Scorer(router, pool).score(["q"] * 4, query_emb=q.numpy())
    alone = EvidenceScorer.from_router(router, pool).score(query_emb=q.numpy())
    np.testing.assert_allclose(full, alone, atol=1e-5)  # float32 torch vs float64 numpy
    with torch.no_grad():
        router.evidence.lm_weight.fill_(0.5)
    assert not router.evidence.lm_silent
    assert np.abs(Scorer(router, pool).score(["q"] * 4, query_emb=q.numpy()) - alone).max() > 1e-4  # now the LM moves p
