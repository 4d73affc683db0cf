"""The profile cache and batched scorer (DESIGN.md section 2, inference).

Each registered model's prefix (system prompt + its K-anchor profile) is run
once, when the model is added; its key/value cache is kept, stacked with the
other models' caches so a call never re-stacks them. Scoring Q queries against
T models then runs only the T*Q query suffixes against those caches.

For Qwen2 / Llama decoders the suffixes run through ``_shared_forward``, the
decoder written out in plain PyTorch: the queries' heads are grouped by their
key/value head, so one attention per (model, kv head) covers all queries and a
model's cached prefix keys/values are read once, never copied per row. The last layer runs only at
each suffix's last token, the one whose output is read. Other architectures
take ``_packed_forward``: transformers' own forward with ``pack`` suffixes per
row behind a block mask and a copy of the model's cache per row.

A forward holds at most max(1, max_rows // T) * pack queries against the T
models, which bounds memory on both paths.

Queries are tokenised once and sorted by suffix length before chunking, so a
chunk pads to similar lengths; right padding never changes a score (a causal
mask hides later pads from the last real token).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from icl_router.model.router import ICLRouter, PrefixCache, pad_ids


class Scorer:
    """p(Yes) of queries against the registered models, with every profile prefix computed once.

    Thread-safe for serving: ``add`` / ``remove`` swap the stacked cache under a lock
    while ``score`` works on the snapshot it took, so a request never sees a half-added model.
    """

    def __init__(self, router: ICLRouter, pool: dict[str, np.ndarray] | None = None, *, max_rows: int = 64, pack: int = 32) -> None:
        if max_rows < 1 or pack < 1:
            raise ValueError(f"max_rows and pack must be >= 1, got max_rows={max_rows}, pack={pack}")
        self.router = router.eval()
        self.max_rows, self.pack = max_rows, pack
        self.meta = None  # the RouterMeta when built by from_dir
        # False sends every forward through transformers (_packed_forward); tests set it to check that path
        self.shared_attention = shared_attention_supported(router.lm)
        self._lock = threading.Lock()
        self._profiles: dict[str, np.ndarray] = {}  # model_id -> bool [K], registration order
        self._caches: dict[str, PrefixCache] = {}  # model_id -> per layer (k, v) [1, kv, P, d]
        self._stacked: tuple[list[str], PrefixCache, torch.Tensor] | None = None  # (models, per layer [T, kv, P, d], profiles [T, K])
        for model_id, profile in (pool or {}).items():
            self.add(model_id, profile)

    @classmethod
    def from_dir(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw: int) -> Scorer:
        """A scorer over a router directory's registered pool (profiles.parquet); ``kw``: max_rows, pack."""
        from icl_router.model.router_dir import load_router_dir

        loaded = load_router_dir(path, dtype=dtype, device=device)
        scorer = cls(loaded.router, loaded.pool, **kw)
        scorer.meta = loaded.meta
        return scorer

    @property
    def models(self) -> list[str]:
        with self._lock:
            return list(self._profiles)

    def add(self, model_id: str, profile: np.ndarray | Sequence[bool]) -> None:
        """Register (or replace) a model by its outcomes on the K anchors: one prefix forward."""
        prof = np.asarray(profile)
        if prof.shape != (self.router.k,):
            raise ValueError(f"profile of {model_id!r} must hold one outcome per anchor: shape ({self.router.k},), got {prof.shape}")
        prof = prof.astype(bool)
        cache = self.router.build_prefix_cache(torch.from_numpy(prof))  # outside the lock: the slow part
        with self._lock:
            self._profiles[model_id] = prof
            self._caches[model_id] = cache
            self._stacked = None

    def remove(self, model_id: str) -> None:
        with self._lock:
            if model_id not in self._profiles:
                raise KeyError(f"model {model_id!r} is not registered; registered: {list(self._profiles)}")
            del self._profiles[model_id], self._caches[model_id]
            self._stacked = None

    def _snapshot(self) -> tuple[list[str], PrefixCache, torch.Tensor]:
        with self._lock:
            if self._stacked is None:
                order = list(self._caches)
                if not order:
                    raise ValueError("the pool is empty: register at least one model before scoring")
                caches = [self._caches[m] for m in order]
                stacked = tuple(
                    (torch.cat([c[li][0] for c in caches]), torch.cat([c[li][1] for c in caches])) for li in range(len(caches[0]))
                )  # per layer [T, kv, P, d]
                self._stacked = (order, stacked, torch.from_numpy(np.stack([self._profiles[m] for m in order])))
            return self._stacked

    @torch.no_grad()
    def score(self, texts: Sequence[str], *, query_emb: np.ndarray | torch.Tensor | None = None, models: Sequence[str] | None = None) -> np.ndarray:
        """p(Yes) float32 [Q, T] for Q queries against ``models`` (default: all, registration order)."""
        order, stacked, profiles = self._snapshot()
        if models is not None:
            pos = {m: i for i, m in enumerate(order)}
            unknown = [m for m in models if m not in pos]
            if unknown:
                raise KeyError(f"models {unknown} are not registered; registered: {order}")
            idx = torch.tensor([pos[m] for m in models], dtype=torch.long)
            stacked = tuple((k.index_select(0, idx), v.index_select(0, idx)) for k, v in stacked)
            profiles = profiles[idx]
        T, Q = stacked[0][0].shape[0], len(texts)
        if Q == 0 or T == 0:
            return np.zeros((Q, T), dtype=np.float32)
        qe = None
        if self.router.layout.query_input == "vector":
            if query_emb is None:
                raise ValueError("this router reads the query as a vector (query_input='vector'): pass query_emb [Q, E]")
            qe = torch.as_tensor(np.asarray(query_emb, dtype=np.float32))
            if qe.shape != (Q, self.router.anchor_emb.shape[1]):
                raise ValueError(f"query_emb must be [Q={Q}, E={self.router.anchor_emb.shape[1]}], got {tuple(qe.shape)}")
        seqs = [self.router.layout.suffix(t).ids for t in texts]
        by_len = np.argsort([len(s) for s in seqs], kind="stable")
        out = torch.empty(Q, T)
        step = max(1, self.max_rows // T) * self.pack  # queries per chunk (packed: T * step / pack rows)
        for lo in range(0, Q, step):
            rows = torch.from_numpy(by_len[lo : lo + step])
            forward = self._shared_forward if self.shared_attention else self._packed_forward
            d = forward(stacked, [seqs[i] for i in rows.tolist()], None if qe is None else qe[rows])  # [T, q]
            if self.router.evidence is not None:
                d = d + self.router.evidence(qe[rows], self.router.anchor_emb, profiles)  # [T, q]
            out[rows] = torch.sigmoid(d.float()).T.cpu()
        return out.numpy()

    def _packed_forward(self, stacked: PrefixCache, seqs: list[list[int]], qe: torch.Tensor | None) -> torch.Tensor:
        """q suffixes against T cached prefixes -> logit(Yes)-logit(No) [T, q].

        ``pack`` suffixes share one row: ``[s_1 | s_2 | ... | s_pack]``, each padded to S,
        under a block mask (a suffix sees the whole prefix and itself, causally) with its
        positions restarting at P. A row needs its own copy of its model's cache, so
        packing divides the cache copies (the main cost after attention) by ``pack``.
        """
        r = self.router
        T, P = stacked[0][0].shape[0], stacked[0][0].shape[2]
        g = min(self.pack, len(seqs))
        n_grp = -(-len(seqs) // g)
        pad = r.lm.config.pad_token_id or 0
        filler = [seqs[0]] * (n_grp * g - len(seqs))  # fills the last row; its scores are dropped
        ids, lens = pad_ids(seqs + filler, pad)  # [n_grp*g, S], [n_grp*g]
        if qe is not None:
            qe = torch.cat([qe, qe[:1].expand(len(filler), -1)])
        S = ids.shape[1]
        x = r.embed_suffix(ids, qe)  # [n_grp*g, S, H]
        x = x.reshape(n_grp, g * S, -1).repeat(T, 1, 1)  # row t*n_grp + i: group i against model t
        dev, dt = x.device, x.dtype
        kv = tuple((k.repeat_interleave(n_grp, 0), v.repeat_interleave(n_grp, 0)) for k, v in stacked)  # per layer [T*n_grp, kv, P, d]
        block = torch.arange(g * S, device=dev) // S  # [gS] which suffix a column holds
        causal = torch.ones(g * S, g * S, dtype=torch.bool, device=dev).tril()
        see = torch.cat([torch.ones(g * S, P, dtype=torch.bool, device=dev), causal & (block[:, None] == block[None, :])], 1)  # [gS, P+gS]
        mask = torch.zeros(1, 1, g * S, P + g * S, dtype=dt, device=dev).masked_fill(~see, torch.finfo(dt).min)
        pos = (P + torch.arange(S, device=dev)).repeat(g).expand(len(x), -1)  # [rows, gS]
        from transformers import DynamicCache

        past = DynamicCache(ddp_cache_data=kv, config=r.lm.config)
        h = r.lm.base_model(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True).last_hidden_state
        last = (torch.arange(n_grp * g) % g) * S + lens - 1  # [n_grp*g] column of each suffix's last token
        h = h.view(T, n_grp, g * S, -1)[:, torch.arange(n_grp * g) // g, last.to(dev)]  # [T, n_grp*g, H]
        return r._yes_no(h)[:, : len(seqs)]

    def _shared_forward(self, stacked: PrefixCache, seqs: list[list[int]], qe: torch.Tensor | None) -> torch.Tensor:
        """n suffixes against T cached prefixes -> logit(Yes)-logit(No) [T, n], Qwen2/Llama decoder math.

        Shapes: T models, n queries, S suffix tokens (right-padded), P prefix tokens, H hidden,
        kv key/value heads, G query heads per kv head, d head size. Suffix token j sits at
        position P + j. The prefix keys/values [T, kv, P, d] are used as they are: a query's
        heads are grouped by their kv head, so one attention per (model, kv head) covers all
        n*G*S query rows (``prefix_attention``). Each suffix's own causal block is small and
        computed directly; the two blocks are joined into one softmax by their log-sum-exps.
        """
        r = self.router
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
    the own block needs and never holds the [L, P] scores (3-4x faster than the matmuls
    below at K=500); elsewhere, or with ``fused=False``, the same in plain matmuls."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused and flash is not None and q.device.type == "cpu":
        out, lse = flash(q, k, v, scale=1.0)[:2]
        return out, lse
    s = torch.matmul(q, k.transpose(-1, -2)).float()  # [B, h, L, P]
    lse = s.logsumexp(-1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse


def shared_attention_supported(lm: object) -> bool:
    """Whether ``Scorer._shared_forward`` reproduces this LM: Qwen2 / Llama decoders with full
    attention in every layer and a RoPE that does not depend on the sequence length."""
    cfg = lm.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    return (
        cfg.model_type in ("qwen2", "llama")
        and all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"])
        and rope not in ("dynamic", "longrope")
    )
