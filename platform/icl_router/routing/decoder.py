"""The Qwen2 / Llama decoder written out, for scoring suffixes against cached prefixes.

``Scorer`` runs a chunk of n query suffixes against T models' cached prefixes.
Through transformers' forward every (model, query) row needs its own copy of its
model's cache. Written out here, the queries' heads are grouped by their
key/value head, so one attention per (model, kv head) covers all n queries and a
model's cached prefix keys/values are read once, never copied per row; the last
layer runs only at each suffix's last token, the one whose output is read. The
scores equal the uncached full forward (tests/unit/test_scorer.py).

This reaches into transformers' model internals. Written against transformers
5.19 (the version pyproject.toml pins); tests/unit/test_decoder.py checks every
item below on the installed version, so an upgrade that breaks one fails there,
and ``supported`` turns this path off (with a warning) for a model that breaks one:

- config: ``model_type`` "qwen2" or "llama"; ``layer_types`` all "full_attention"
  (no sliding window); ``rope_parameters["rope_type"]`` not "dynamic" / "longrope"
  (RoPE must not depend on the sequence length); ``pad_token_id``.
- ``lm.base_model`` has exactly the children ``embed_tokens``, ``layers``,
  ``norm`` and ``rotary_emb``; ``rotary_emb(x, position_ids)`` returns
  ``(cos, sin)``, each [batch, seq, head_dim].
- each decoder layer has exactly ``self_attn``, ``mlp``, ``input_layernorm`` and
  ``post_attention_layernorm`` and computes the pre-norm residual
  ``x + o_proj(attn(input_layernorm(x)))``, then ``x + mlp(post_attention_layernorm(x))``.
- each ``self_attn`` has exactly the children ``q_proj``, ``k_proj``, ``v_proj``,
  ``o_proj`` (``nn.Linear``, biases allowed: no q/k norms) and the attributes
  ``head_dim``, ``num_key_value_groups`` (query heads per kv head) and ``scaling``;
  the module defining its class defines ``rotate_half`` and
  ``apply_rotary_pos_emb(q, k, cos, sin)`` = ``(q * cos + rotate_half(q) * sin, ...)``.
- the prefix caches (``ICLRouter.build_prefix_cache``, from ``DynamicCache.layers[i]``
  ``.keys`` / ``.values``) hold per layer keys and values [batch, kv_heads, P, head_dim],
  the keys already rotated.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

from icl_router.model.router import ICLRouter, PrefixCache, pad_ids

ARCHITECTURES = ("qwen2", "llama")
BASE_CHILDREN = {"embed_tokens", "layers", "norm", "rotary_emb"}
LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
ATTENTION_ATTRS = ("head_dim", "num_key_value_groups", "scaling")
ROPE_HELPERS = ("rotate_half", "apply_rotary_pos_emb")


def architecture_supported(lm: Any) -> bool:
    """Whether the LM's config is one this forward reproduces: Qwen2 / Llama decoders with full
    attention in every layer and a RoPE that does not depend on the sequence length."""
    cfg = lm.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    return (
        cfg.model_type in ARCHITECTURES
        and all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"])
        and rope not in ("dynamic", "longrope")
    )


def assumption_problems(lm: Any) -> list[str]:
    """The module docstring's structural assumptions this LM breaks (empty: all hold)."""
    problems = []
    base = lm.base_model
    children = {name for name, _ in base.named_children()}
    if children != BASE_CHILDREN:
        problems.append(f"base model children {sorted(children)}, expected {sorted(BASE_CHILDREN)}")
    for i, layer in enumerate(getattr(base, "layers", [])):
        children = {name for name, _ in layer.named_children()}
        if children != LAYER_CHILDREN:
            problems.append(f"layer {i} children {sorted(children)}, expected {sorted(LAYER_CHILDREN)}")
            continue
        at = layer.self_attn
        children = {name for name, _ in at.named_children()}
        if children != ATTENTION_CHILDREN or not all(isinstance(getattr(at, n), torch.nn.Linear) for n in ATTENTION_CHILDREN):
            problems.append(f"layer {i} self_attn children {sorted(children)}, expected nn.Linear {sorted(ATTENTION_CHILDREN)}")
        missing = [a for a in ATTENTION_ATTRS if not isinstance(getattr(at, a, None), int | float)]
        if missing:
            problems.append(f"layer {i} self_attn lacks the numbers {missing}")
        module = sys.modules[type(at).__module__]
        missing = [h for h in ROPE_HELPERS if not callable(getattr(module, h, None))]
        if missing:
            problems.append(f"{module.__name__} does not define {missing}")
    return problems


def supported(lm: Any) -> bool:
    """Whether ``shared_forward`` reproduces this LM (else the scorer takes transformers' forward)."""
    if not architecture_supported(lm):
        return False
    problems = assumption_problems(lm)
    if problems:
        warnings.warn(
            "the scorer's written-out decoder (routing/decoder.py) does not match this transformers version: "
            + "; ".join(problems) + ". Scoring falls back to transformers' forward (slower, same scores).",
            stacklevel=2,
        )
    return not problems


def shared_forward(router: ICLRouter, stacked: PrefixCache, *, seqs: list[list[int]], qe: torch.Tensor | None) -> torch.Tensor:
    """n suffixes (token ids) against T cached prefixes -> logit(Yes)-logit(No) [T, n].

    Shapes: T models, n queries, S suffix tokens (right-padded), P prefix tokens, H hidden,
    kv key/value heads, G query heads per kv head, d head size. Suffix token j sits at
    position P + j. The prefix keys/values [T, kv, P, d] are used as they are: a query's
    heads are grouped by their kv head, so one attention per (model, kv head) covers all
    n*G*S query rows (``prefix_attention``). Each suffix's own causal block is small and
    computed directly; the two blocks are joined into one softmax by their log-sum-exps.
    """
    r = router
    base = r.lm.base_model
    layers = base.layers
    rotate_half = sys.modules[type(layers[0].self_attn).__module__].rotate_half  # the model's own RoPE helper
    P = stacked[0][0].shape[2]
    ids, lens = pad_ids(seqs, r.lm.config.pad_token_id or 0)  # [n, S], [n]
    n, S = ids.shape
    x = r.embed_suffix(ids, qe)[None]  # [1, n, S, H]: the same for every model until the first attention
    dev = x.device
    last = (lens - 1).to(dev)  # [n] index of each suffix's last real token
    cos, sin = base.rotary_emb(x, (P + torch.arange(S, device=dev))[None])  # [1, S, d] each
    cos, sin = cos[0], sin[0]  # [S, d]
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()  # [S(query), S(key)]
    for li, layer in enumerate(layers):
        at = layer.self_attn
        d, G = at.head_dim, at.num_key_value_groups
        kp, vp = stacked[li]  # [T, kv, P, d]
        kv = kp.shape[1]
        B = x.shape[0]  # 1 at the first layer, T after
        h = layer.input_layernorm(x)  # [B, n, S, H]
        k = at.k_proj(h).view(B, n, S, kv, d).permute(0, 3, 1, 2, 4)  # [B, kv, n, S, d]
        v = at.v_proj(h).view(B, n, S, kv, d).permute(0, 3, 1, 2, 4)  # [B, kv, n, S, d]
        k = k * cos + rotate_half(k) * sin  # = apply_rotary_pos_emb; q may sit at other positions
        if li == len(layers) - 1:  # only each suffix's last token is read: its query row alone
            x = x[:, torch.arange(n, device=dev), last][:, :, None]  # [B, n, 1, H]
            h = h[:, torch.arange(n, device=dev), last][:, :, None]  # [B, n, 1, H]
            qcos, qsin = cos[last][:, None, None], sin[last][:, None, None]  # [n, 1, 1, d]
            see = (torch.arange(S, device=dev) <= last[:, None])[:, None, None]  # [n, 1, 1, S]
        else:
            qcos, qsin, see = cos, sin, causal
        Sq = h.shape[2]
        q = at.q_proj(h).view(B, n, Sq, kv, G, d).permute(0, 3, 1, 4, 2, 5)  # [B, kv, n, G, Sq, d]
        q = (q * qcos + rotate_half(q) * qsin) * at.scaling
        # prefix block: the n*G*Sq query rows of a (model, kv head) against its P keys, K/V not repeated
        op, lp = prefix_attention(q.reshape(B, kv, n * G * Sq, d).expand(len(kp), -1, -1, -1), kp, vp)  # [T, kv, nGSq, d], [T, kv, nGSq]
        op, lp = op.view(-1, kv, n, G, Sq, d), lp.view(-1, kv, n, G, Sq, 1)
        # own block: each suffix against its own keys, causally
        so = torch.matmul(q, k[:, :, :, None].transpose(-1, -2)).float()  # [B, kv, n, G, Sq, S]
        so = so.masked_fill(~see, float("-inf"))  # causal (and pads after the last token) hidden
        lo = so.logsumexp(-1, keepdim=True)  # [B, kv, n, G, Sq, 1]
        oo = torch.matmul(torch.exp(so - lo).to(v.dtype).flatten(3, 4), v).view(-1, kv, n, G, Sq, d)  # [B, kv, n, G, Sq, d]
        # one softmax over both blocks: weight each block's output by its share of the total mass
        lz = torch.logaddexp(lp, lo)  # [T, kv, n, G, Sq, 1]
        o = op * torch.exp(lp - lz).to(op.dtype) + oo * torch.exp(lo - lz).to(oo.dtype)  # [T, kv, n, G, Sq, d]
        o = o.permute(0, 2, 4, 1, 3, 5).reshape(-1, n, Sq, kv * G * d)  # [T, n, Sq, heads*d]
        x = x + at.o_proj(o)  # [T, n, Sq, H]
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return r._yes_no(base.norm(x[:, :, 0]))  # [T, n]


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T) v and the log-sum-exp of the scores (q pre-scaled, no mask):
    q [B, h, L, d], k and v [B, h, P, d] -> ([B, h, L, d], float32 [B, h, L]).

    On CPU PyTorch's flash-attention kernel, which returns the log-sum-exp the join with
    the own block needs and never holds the [L, P] scores (faster than the matmuls
    below at large K); elsewhere, or with ``fused=False``, the same in plain matmuls."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused and flash is not None and q.device.type == "cpu":
        out, lse = flash(q, k, v, scale=1.0)[:2]
        return out, lse
    s = torch.matmul(q, k.transpose(-1, -2)).float()  # [B, h, L, P]
    lse = s.logsumexp(-1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse
