"""The cached batched scorer equals the uncached full forward for every (query, model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.routing.decoder import prefix_attention
from icl_router.routing.scorer import Scorer
from icl_router.testing import full_forward_p

QUERIES = [
    "Hi?",
    "Name the capital city of France.",
    "Write a python function that returns the sorted list of primes below n, then explain why the sieve "
    "of Eratosthenes is faster than trial division for large n, and what its memory cost is. " * 3,
    "What is 2+2?",
    "A triangle has sides 3, 4 and 5. What is its area?",
]
MODES = [(q, p) for q in ("text", "vector") for p in ("pairs", "fused")]
E, K, T = 24, 8, 3


@pytest.fixture(scope="module")
def tiny(tiny_router_lm):
    return tiny_router_lm  # read-only here: the scorer only runs forwards (no_grad, eval)


def make(tiny, query_input, profile_layout):
    lm, tok = tiny
    torch.manual_seed(1)
    router = ICLRouter(lm, PromptLayout(tok, query_input=query_input, profile_layout=profile_layout), anchor_emb=torch.randn(K, E))
    profiles = torch.rand(T, K, generator=torch.Generator().manual_seed(0)) < 0.5  # [T, K]
    pool = {f"m{t}": profiles[t].numpy() for t in range(T)}
    return router, profiles, pool


def full_forward(router, profiles, query_emb):
    """p(Yes) [Q, T] from the naive per-pair prompts (prefix recomputed for every pair)."""
    return full_forward_p(router, profiles, query_emb, QUERIES).numpy()


@pytest.mark.parametrize("query_input,profile_layout", MODES)
@pytest.mark.parametrize("max_rows,pack", [(64, 8), (9, 2), (1, 1)])  # one chunk (packed: one row); a filler suffix; unpacked
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "packed"])  # routing.decoder / the transformers fallback
def test_cached_scores_equal_full_forward(tiny, query_input, profile_layout, max_rows, pack, shared):
    router, profiles, pool = make(tiny, query_input, profile_layout)
    lens = [len(router.layout.suffix(q).ids) for q in QUERIES]
    if query_input == "text":  # the batch pads hard (>100 tokens): padding must not leak into any score
        assert max(lens) - min(lens) > 100
    q_emb = torch.randn(len(QUERIES), E)
    scorer = Scorer(router, pool, max_rows=max_rows, pack=pack)
    assert scorer.shared_attention  # Qwen2: the custom forward is the default
    scorer.shared_attention = shared
    p = scorer.score(QUERIES, query_emb=q_emb)
    ref = full_forward(router, profiles, q_emb)
    assert p.shape == (len(QUERIES), T)
    # float32 through a 2-layer LM: the cached prefix and the per-pair forward sum in another order
    assert np.abs(p - ref).max() < 1e-4
    assert np.abs(p[:, 0] - p[:, 1]).max() > 1e-6  # scores depend on the profile (well above rounding)


@pytest.mark.parametrize("query_input,profile_layout", [("vector", "pairs"), ("text", "fused")])
def test_llama_router_takes_the_shared_forward(tiny, query_input, profile_layout):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        num_hidden_layers=2,
        attention_bias=True,  # exercises the q/k/v/o biases
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(2)
    lm = LlamaForCausalLM(cfg).eval()
    router, profiles, pool = make((lm, tok), query_input, profile_layout)
    q_emb = torch.randn(len(QUERIES), E)
    scorer = Scorer(router, pool, max_rows=9, pack=2)
    assert scorer.shared_attention
    p = scorer.score(QUERIES, query_emb=q_emb)
    assert np.abs(p - full_forward(router, profiles, q_emb)).max() < 1e-4
    assert np.abs(p[:, 0] - p[:, 1]).max() > 1e-6


def test_prefix_attention_fused_equals_matmuls():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 32, generator=g) for n in (40, 70, 70))  # [B, h, L or P, d]
    o_fused, lse_fused = prefix_attention(q, k, v)
    o, lse = prefix_attention(q, k, v, fused=False)
    torch.testing.assert_close(o_fused, torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    torch.testing.assert_close(o, o_fused)
    torch.testing.assert_close(lse, lse_fused)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2), -1))


def test_add_remove_and_model_subset(tiny):
    router, _, pool = make(tiny, "vector", "pairs")
    q_emb = np.random.default_rng(0).standard_normal((len(QUERIES), E)).astype(np.float32)
    scorer = Scorer(router, pool, pack=2)
    full = scorer.score(QUERIES, query_emb=q_emb)
    assert scorer.models == ["m0", "m1", "m2"]
    # A subset or a smaller pool changes the rows batched together, so float32 sums run in another
    # order: equal up to rounding (atol), not bit for bit.
    np.testing.assert_allclose(scorer.score(QUERIES, query_emb=q_emb, models=["m2", "m0"]), full[:, [2, 0]], atol=1e-6)
    scorer.remove("m1")
    assert scorer.models == ["m0", "m2"]
    np.testing.assert_allclose(scorer.score(QUERIES, query_emb=q_emb), full[:, [0, 2]], atol=1e-6)
    scorer.add("m0", pool["m1"])  # re-adding replaces the profile
    np.testing.assert_allclose(scorer.score(QUERIES, query_emb=q_emb, models=["m0"]), full[:, [1]], atol=1e-6)
    with pytest.raises(KeyError, match="'m1'.*registered"):
        scorer.score(QUERIES, query_emb=q_emb, models=["m1"])
    with pytest.raises(ValueError, match="query_emb"):
        scorer.score(QUERIES)
    with pytest.raises(ValueError, match=f"shape \\({K},\\)"):
        scorer.add("m9", np.ones(K + 1, dtype=bool))
    for m in scorer.models:
        scorer.remove(m)
    with pytest.raises(ValueError, match="pool is empty"):
        scorer.score(QUERIES, query_emb=q_emb)
