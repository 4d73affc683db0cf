"""The transformers internals routing/decoder.py relies on still hold for the installed version.

Each check is one item of the module docstring's list; an upgrade that breaks one fails here
by name (the scores themselves are checked against the full forward in test_scorer.py).
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch

from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.routing import decoder


def tiny_llama(vocab: int, pad: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
        num_hidden_layers=2, attention_bias=True, pad_token_id=pad, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def lm(request, tiny_router_lm):
    qwen, tok = tiny_router_lm
    # a copy: one test edits a layer (and puts it back) to break an assumption
    return (copy.deepcopy(qwen) if request.param == "qwen2" else tiny_llama(len(tok), tok.pad_token_id)), tok


def test_the_architectures_meet_every_structural_assumption(lm):
    model, _ = lm
    assert decoder.architecture_supported(model)
    assert decoder.assumption_problems(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mismatch would warn and fall back
        assert decoder.supported(model)


def test_rope_helpers_and_rotary_embedding_are_what_the_decoder_computes(lm):
    model, _ = lm
    at = model.base_model.layers[0].self_attn
    module = sys.modules[type(at).__module__]
    g = torch.Generator().manual_seed(0)
    S, d = 5, at.head_dim
    x = torch.randn(1, S, model.config.hidden_size, generator=g)
    cos, sin = model.base_model.rotary_emb(x, (7 + torch.arange(S))[None])
    assert cos.shape == sin.shape == (1, S, d)
    q, k = torch.randn(2, 1, 3, S, d, generator=g).unbind(0)  # [B, heads, S, d]
    q_rot, k_rot = module.apply_rotary_pos_emb(q, k, cos, sin)
    c, s = cos[:, None], sin[:, None]
    torch.testing.assert_close(q_rot, q * c + module.rotate_half(q) * s)
    torch.testing.assert_close(k_rot, k * c + module.rotate_half(k) * s)


def test_a_decoder_layer_is_the_pre_norm_residual_block(lm):
    model, _ = lm
    base, layer = model.base_model, model.base_model.layers[0]
    at = layer.self_attn
    module = sys.modules[type(at).__module__]
    g = torch.Generator().manual_seed(1)
    S, H, d, G = 6, model.config.hidden_size, at.head_dim, at.num_key_value_groups
    x = torch.randn(1, S, H, generator=g)
    pos = torch.arange(S)[None]
    cos, sin = base.rotary_emb(x, pos)
    mask = torch.zeros(1, 1, S, S).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), torch.finfo(x.dtype).min)
    with torch.no_grad():
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        out = out[0] if isinstance(out, tuple) else out
        h = layer.input_layernorm(x)
        q = at.q_proj(h).view(1, S, -1, d).transpose(1, 2)  # [1, heads, S, d]
        k = at.k_proj(h).view(1, S, -1, d).transpose(1, 2)  # [1, kv, S, d]
        v = at.v_proj(h).view(1, S, -1, d).transpose(1, 2)
        q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        att = torch.softmax((q @ k.transpose(-1, -2)) * at.scaling + mask, -1) @ v  # [1, heads, S, d]
        y = x + at.o_proj(att.transpose(1, 2).reshape(1, S, -1))
        y = y + layer.mlp(layer.post_attention_layernorm(y))
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)


def test_prefix_caches_hold_rotated_keys_per_layer(lm):
    model, tok = lm
    torch.manual_seed(0)
    router = ICLRouter(model, PromptLayout(tok, query_input="vector"), anchor_emb=torch.randn(4, 8))
    cache = router.build_prefix_cache(torch.tensor([[True, False, True, True], [False] * 4]))
    at = model.base_model.layers[0].self_attn
    P = router.prefix_ids.numel()
    kv = model.config.num_key_value_heads
    assert len(cache) == model.config.num_hidden_layers
    for keys, values in cache:
        assert keys.shape == values.shape == (2, kv, P, at.head_dim)
    # the cached keys are after RoPE: layer 0's keys of the prefix, rotated at positions 0..P-1
    with torch.no_grad():
        x = router.embed_prefix(torch.tensor([[True, False, True, True]]))
        h = model.base_model.layers[0].input_layernorm(x)
        k = at.k_proj(h).view(1, P, kv, at.head_dim).transpose(1, 2)
        cos, sin = model.base_model.rotary_emb(x, torch.arange(P)[None])
        rotated = k * cos[:, None] + sys.modules[type(at).__module__].rotate_half(k) * sin[:, None]
    torch.testing.assert_close(cache[0][0][:1], rotated, atol=1e-5, rtol=1e-5)


def test_a_broken_assumption_turns_the_path_off_with_a_warning(lm):
    model, _ = lm
    layer = model.base_model.layers[0]
    layer.self_attn.q_norm = torch.nn.Identity()  # what a q/k-norm architecture would add
    try:
        assert any("q_norm" in p for p in decoder.assumption_problems(model))
        with pytest.warns(UserWarning, match="falls back to transformers' forward"):
            assert not decoder.supported(model)
    finally:
        del layer.self_attn.q_norm
    assert decoder.supported(model)
