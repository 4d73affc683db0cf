"""The evidence-only scorer (routing/fast.py) gives the evidence head's p, with the pool's part precomputed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.routing.fast import EvidenceScorer

K, E, T = 40, 16, 5


@pytest.fixture(scope="module")
def router(tiny_router_lm):
    lm, tok = tiny_router_lm  # read-only: only the evidence head is set below
    torch.manual_seed(0)
    r = ICLRouter(lm, PromptLayout(tok, query_input="vector", profile_layout="pairs"), anchor_emb=torch.randn(K, E), anchor_evidence=True).eval()
    with torch.no_grad():  # a trained head: every temperature and the rate weighed
        r.evidence.weight.copy_(torch.tensor([0.7, 1.3, -0.4, 0.5]))
        r.evidence.bias.fill_(-0.2)
    return r


def test_same_p_as_the_evidence_head(router):
    rng = np.random.default_rng(0)
    pool = {f"m{i}": rng.random(K) < 0.2 + 0.15 * i for i in range(T)}
    q = rng.standard_normal((7, E)).astype(np.float32)
    fast = EvidenceScorer.from_router(router, pool)
    with torch.no_grad():
        want = torch.sigmoid(router.evidence(torch.from_numpy(q), router.anchor_emb, torch.from_numpy(np.stack(list(pool.values()))))).T.numpy()  # [Q, T]
    got = fast.score(query_emb=q)
    assert got.shape == (7, T) and np.abs(got - want).max() < 1e-5  # float32 head vs float64 numpy
    sub = fast.score(["unused"] * 7, query_emb=q, models=["m3", "m0"])
    np.testing.assert_allclose(sub, got[:, [3, 0]], atol=1e-7)
    np.testing.assert_allclose(fast.score(query_emb=q, sim=fast.similarity(q)), got, atol=1e-7)


def test_pool_changes_and_errors(router):
    fast = EvidenceScorer.from_router(router)
    with pytest.raises(ValueError, match="pool is empty"):
        fast.score(query_emb=np.ones((1, E)))
    fast.add("a", np.ones(K, bool))
    fast.add("b", np.zeros(K, bool))
    p = fast.score(query_emb=np.ones((2, E)))
    assert p.shape == (2, 2) and (p[:, 0] > p[:, 1]).all()  # always right beats always wrong
    fast.remove("a")
    assert fast.models == ["b"] and fast.score(query_emb=np.ones((1, E))).shape == (1, 1)
    with pytest.raises(ValueError, match="one outcome per anchor"):
        fast.add("c", np.ones(K + 1, bool))
    with pytest.raises(KeyError, match="not registered"):
        fast.score(query_emb=np.ones((1, E)), models=["zz"])
    with pytest.raises(ValueError, match=r"query_emb must be \[Q, E=16\]"):
        fast.score(query_emb=np.ones((1, E + 1)))
