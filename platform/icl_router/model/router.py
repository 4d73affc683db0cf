"""ICLRouter: a causal LM reading projected vectors at placeholder positions.

Three ways to run stage 2, equal up to float rounding (tests/unit/test_model.py):

- ``forward_pairs``: the naive reference, one full prompt per (profile, query) pair.
- ``forward_shared``: training. Each model's prefix is computed once per batch
  and its B suffixes run against the prefix KV cache, gradients flowing back
  through the cache. Under gradient checkpointing (where HF drops KV caches) an
  equivalent packed form runs: one row per model, ``[prefix, s1, ..., sB]``,
  with a block mask and positions restarting after the prefix.
- ``build_prefix_cache``: inference. A model's prefix KV cache is computed
  once; ``routing.Scorer`` (the one scoring path: evaluation, the demo, the
  service) scores queries against the cached prefixes of T models.

The logit of interest is ``logit(Yes) - logit(No)`` at the last suffix token
(the position that predicts the answer); only those two rows of the LM head
are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from icl_router.model.evidence import AnchorEvidence
from icl_router.model.projector import Projector
from icl_router.model.prompt import PromptLayout

# One prefix KV cache: per layer (keys, values), each [M, kv_heads, P, head_dim].
PrefixCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass
class Pairs:
    """Stage-2 (profile, query) pairs grouped by model: pair i uses profile ``model_idx[i]``."""

    profiles: torch.Tensor  # bool [M, K]: the M models' outcomes on the K anchors
    model_idx: torch.Tensor  # long [N]
    suffix_ids: torch.Tensor  # long [N, S], right-padded
    suffix_len: torch.Tensor  # long [N]
    query_emb: torch.Tensor | None = None  # float [N, E]; required when query_input == "vector"


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, *, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: ([N, S] long, lengths [N] long). Right padding needs no
    attention mask: under a causal mask no real token sees a pad that follows it."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lens.max())), pad_id if fill is None else fill, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lens


class ICLRouter(nn.Module):
    """Router LM + projector + prompt layout + the K anchor embeddings.

    Every model is described by the same K anchors in the same order, so the
    anchors' embeddings live here (a buffer) and a model's profile is just its
    K outcomes (bool [K]). ``anchor_evidence`` adds ``AnchorEvidence``'s logit (kNN on
    the profile) to the LM's; it reads the query's vector, so only with vector queries.
    """

    def __init__(self, lm: Any, layout: PromptLayout, *, anchor_emb: torch.Tensor, anchor_evidence: bool = False) -> None:
        super().__init__()
        impl = getattr(lm.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"router LM attn_implementation={impl!r}: the block mask needs 'sdpa' or 'eager'")
        self.lm, self.layout = lm, layout
        tok_emb = lm.get_input_embeddings().weight
        self.projector = Projector(anchor_emb.shape[-1], tok_emb.shape[1], out_rms=float(tok_emb.detach().float().pow(2).mean().sqrt()))
        self.register_buffer("anchor_emb", anchor_emb.float())  # [K, E]
        if anchor_evidence and layout.query_input != "vector":
            raise ValueError("anchor_evidence reads the query's vector: it needs query_input='vector'")
        self.evidence = AnchorEvidence() if anchor_evidence else None
        self.placeholder_id, self.yes_id, self.no_id = layout.placeholder_id, layout.yes_id, layout.no_id
        seg = layout.prefix([False] * self.k)  # the label tokens are patched in per model
        self.register_buffer("prefix_ids", torch.tensor(seg.ids), persistent=False)  # [P]
        self.register_buffer("prefix_slots", torch.tensor(seg.slot_pos, dtype=torch.long), persistent=False)  # [K]

    @property
    def k(self) -> int:
        return self.anchor_emb.shape[0]

    # ---- inputs ----------------------------------------------------------------

    def encode_queries(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Suffix token ids of the queries: ([Q, S] right-padded, lengths [Q])."""
        return pad_ids([self.layout.suffix(t).ids for t in texts], self.lm.config.pad_token_id or 0)

    def embed_prefix(self, profiles: torch.Tensor) -> torch.Tensor:
        """bool [M, K] -> inputs_embeds [M, P, H]: the prefix with anchor vectors at the anchor slots."""
        if profiles.ndim != 2 or profiles.shape[1] != self.k:
            raise ValueError(f"profiles must be bool [M, K={self.k}], got shape {tuple(profiles.shape)}")
        emb = self.lm.get_input_embeddings()
        dev = emb.weight.device
        profiles = profiles.to(dev, torch.bool)
        label_ids = torch.where(profiles, self.yes_id, self.no_id)  # [M, K]
        ids = self.prefix_ids.repeat(len(profiles), 1)  # [M, P]
        slot = self.prefix_slots
        vec = self.projector(self.anchor_emb).to(emb.weight.dtype).expand(len(profiles), -1, -1)  # [M, K, H]
        if self.layout.profile_layout == "pairs":
            ids[:, slot + 1] = label_ids  # the label token follows its slot
        else:
            vec = vec + emb(label_ids)  # fused: the label embedding rides on the anchor's slot
        x = emb(ids)  # [M, P, H]
        x[:, slot] = vec
        return x

    def embed_suffix(self, ids: torch.Tensor, query_emb: torch.Tensor | None) -> torch.Tensor:
        """long [N, S] (+ float [N, E] in vector mode) -> inputs_embeds [N, S, H]."""
        emb = self.lm.get_input_embeddings()
        ids = ids.to(emb.weight.device)
        x = emb(ids)  # [N, S, H]
        if self.layout.query_input == "vector":
            if query_emb is None:
                raise ValueError("query_input='vector' needs query_emb [N, E]")
            is_slot = ids == self.placeholder_id  # [N, S]
            if not bool((is_slot.sum(1) == 1).all()):
                raise ValueError("each suffix must hold exactly one query placeholder (query_input='vector')")
            x[is_slot] = self.projector(query_emb.to(x.device)).to(x.dtype)  # rows in order, one slot per row
        return x

    def _yes_no(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., H] -> logit(Yes) - logit(No) [...], from the two LM-head rows only."""
        head = self.lm.get_output_embeddings()
        ids = torch.tensor([self.yes_id, self.no_id], device=h.device)
        if hasattr(head.weight, "ds_id"):  # partitioned by DeepSpeed ZeRO-3: only a module call gathers it
            logits = head(h)[..., ids]  # [..., 2]
        else:
            logits = functional.linear(h, head.weight[ids], None if head.bias is None else head.bias[ids])  # [..., 2]
        return logits[..., 0] - logits[..., 1]

    # ---- stage 2 ---------------------------------------------------------------

    def forward_pairs(self, pairs: Pairs) -> torch.Tensor:
        """Naive reference: the full prompt for every pair, prefix recomputed each time -> [N]."""
        pre = self.embed_prefix(pairs.profiles)[pairs.model_idx]  # [N, P, H]
        x = torch.cat([pre, self.embed_suffix(pairs.suffix_ids, pairs.query_emb)], 1)  # [N, P+S, H]
        h = self.lm.base_model(inputs_embeds=x, use_cache=False).last_hidden_state  # [N, P+S, H]
        last = pre.shape[1] + pairs.suffix_len.to(h.device) - 1  # [N]
        return self._with_evidence(self._yes_no(h[torch.arange(len(h), device=h.device), last]), pairs)

    def forward_shared(self, pairs: Pairs) -> torch.Tensor:
        """Training path: each model's prefix once, its B suffixes against it -> [N].

        The prefix KV cache keeps its gradients, so the loss and every gradient equal
        ``forward_pairs``. HF drops a KV cache under gradient checkpointing, so with
        checkpointing on (large routers) the packed block-mask form runs instead;
        on CPU the cached form is the faster one (bench train-batching).
        """
        if self.training and getattr(self.lm, "is_gradient_checkpointing", False):
            return self._forward_packed(pairs)
        kv = self._prefix_kv(pairs.profiles)
        idx = pairs.model_idx.to(kv[0][0].device)
        kv = tuple((k.index_select(0, idx), v.index_select(0, idx)) for k, v in kv)  # per layer [N, kv_heads, P, head_dim]
        return self._with_evidence(self._suffix_forward(kv, pairs.suffix_ids, pairs.suffix_len, pairs.query_emb), pairs)

    def _forward_packed(self, pairs: Pairs) -> torch.Tensor:
        """Row m is ``[prefix_m, suffixes of model m ..., pad]`` under a block mask: a suffix
        sees the prefix and itself, causally, never another suffix; its positions restart
        at ``len(prefix)``. One plain forward, so it survives gradient checkpointing."""
        pre = self.embed_prefix(pairs.profiles)  # [M, P, H]
        suf = self.embed_suffix(pairs.suffix_ids, pairs.query_emb)  # [N, S, H]
        M, P, H = pre.shape
        dev = pre.device
        model_idx, lens = pairs.model_idx.tolist(), pairs.suffix_len.tolist()
        row_len = [P] * M
        start = []  # pair i's first packed column
        for m, n in zip(model_idx, lens):
            start.append(row_len[m])
            row_len[m] += n
        L = max(row_len)
        x = pre.new_zeros(M, L, H)
        x[:, :P] = pre
        seg = torch.full((M, L), -1, dtype=torch.long)  # 0 prefix, i+1 pair i, -1 pad
        seg[:, :P] = 0
        pos = torch.arange(L).repeat(M, 1)  # [M, L]
        for i, (m, s, n) in enumerate(zip(model_idx, start, lens)):
            x[m, s : s + n] = suf[i, :n]
            seg[m, s : s + n] = i + 1
            pos[m, s : s + n] = torch.arange(P, P + n)
        seg = seg.to(dev)
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()  # [L, L]
        same = seg[:, :, None] == seg[:, None, :]  # [M, L, L]; pads see each other: no empty softmax row
        see = causal & ((seg[:, None, :] == 0) | same)  # [M, L(q), L(k)]
        mask = torch.zeros(M, 1, L, L, dtype=x.dtype, device=dev).masked_fill(~see[:, None], torch.finfo(x.dtype).min)
        h = self.lm.base_model(inputs_embeds=x, attention_mask=mask, position_ids=pos.to(dev), use_cache=False).last_hidden_state
        last = torch.tensor(start, device=dev) + pairs.suffix_len.to(dev) - 1  # [N]
        return self._with_evidence(self._yes_no(h[torch.tensor(model_idx, device=dev), last]), pairs)

    def _with_evidence(self, lm_logit: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """The LM's logit of each pair [N], combined with the anchor evidence's when the router has the head."""
        if self.evidence is None:
            return lm_logit
        return self.evidence.combine(lm_logit, self.evidence.pairs(pairs.query_emb, self.anchor_emb, pairs.profiles, pairs.model_idx))

    def _prefix_kv(self, profiles: torch.Tensor) -> PrefixCache:
        """bool [M, K] -> per layer (keys, values) [M, kv_heads, P, head_dim], gradients kept."""
        out = self.lm.base_model(inputs_embeds=self.embed_prefix(profiles), use_cache=True)
        return tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)

    def _suffix_forward(self, cache: PrefixCache, ids: torch.Tensor, lens: torch.Tensor, query_emb: torch.Tensor | None) -> torch.Tensor:
        """Suffixes [N, S] against a cache of batch N -> logit(Yes)-logit(No) [N] (training: gradients flow into the cache)."""
        from transformers import DynamicCache

        past = DynamicCache(ddp_cache_data=cache, config=self.lm.config)
        x = self.embed_suffix(ids, query_emb)
        # positions default to len(prefix) + arange(S): the suffix continues the prefix
        h = self.lm.base_model(inputs_embeds=x, past_key_values=past, use_cache=True).last_hidden_state  # [N, S, H]
        return self._yes_no(h[torch.arange(len(h), device=h.device), lens.to(h.device) - 1])

    # ---- inference -------------------------------------------------------------

    @torch.no_grad()
    def build_prefix_cache(self, profiles: torch.Tensor) -> PrefixCache:
        """KV cache of the prefixes of bool [K] (one model) or [M, K] profiles; batch M (1 for [K])."""
        return self._prefix_kv(profiles.reshape(-1, self.k))

    # ---- stage 1 ---------------------------------------------------------------

    def forward_stage1(self, ids: torch.Tensor, labels: torch.Tensor, *, query_emb: torch.Tensor) -> torch.Tensor:
        """Query reconstruction loss: ids / labels long [N, L] (labels -100 off the query
        tokens, unshifted), query_emb [N, E] fills the one placeholder per row -> mean CE."""
        emb = self.lm.get_input_embeddings()
        ids = ids.to(emb.weight.device)
        x = emb(ids)  # [N, L, H]
        is_slot = ids == self.placeholder_id
        if not bool((is_slot.sum(1) == 1).all()):
            raise ValueError("each stage-1 row must hold exactly one query placeholder")
        x[is_slot] = self.projector(query_emb.to(x.device)).to(x.dtype)
        logits = self.lm(inputs_embeds=x, use_cache=False).logits  # [N, L, V]
        # position t predicts token t+1
        return functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(x.device), ignore_index=-100)
