"""The profile cache and batched scorer (docs/design.md §2, inference).

Each registered model's prefix (system prompt + its K-anchor profile) is run
once, when the model is added; its key/value cache is kept, stacked with the
other models' caches so a call never re-stacks them. Scoring Q queries against
T models then runs only the T*Q query suffixes against those caches.

The one way the platform scores (evaluation, the demo, the service): for Qwen2 /
Llama decoders the suffixes run through ``routing.decoder.shared_forward``, the
decoder written out in plain PyTorch, which reads each model's cached prefix
once for all queries. Other architectures take ``_packed_forward``:
transformers' own forward with ``pack`` suffixes per row behind a block mask and
a copy of the model's cache per row.

A forward holds at most max(1, max_rows // T) * pack queries against the T
models, which bounds memory on both paths.

Queries are tokenised once and sorted by suffix length before chunking, so a
chunk pads to similar lengths; right padding never changes a score (a causal
mask hides later pads from the last real token).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from icl_router.model.router import ICLRouter, PrefixCache, pad_ids
from icl_router.routing import decoder


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
        # False sends every forward through transformers (_packed_forward); tests and the bench set it to check that path
        self.shared_attention = decoder.supported(router.lm)
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
                profiles = torch.from_numpy(np.stack([self._profiles[m] for m in order])).to(stacked[0][0].device)
                self._stacked = (order, stacked, profiles)
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
            idx = torch.tensor([pos[m] for m in models], dtype=torch.long, device=profiles.device)
            stacked = tuple((k.index_select(0, idx), v.index_select(0, idx)) for k, v in stacked)
            profiles = profiles[idx]
        T, Q = stacked[0][0].shape[0], len(texts)
        if Q == 0 or T == 0:
            return np.zeros((Q, T), dtype=np.float32)
        qe = None
        if self.router.layout.query_input == "vector":
            if query_emb is None:
                raise ValueError("this router reads the query as a vector (query_input='vector'): pass query_emb [Q, E]")
            qe = torch.as_tensor(np.asarray(query_emb, dtype=np.float32)).to(self.router.anchor_emb.device)  # on the router's device
            if qe.shape != (Q, self.router.anchor_emb.shape[1]):
                raise ValueError(f"query_emb must be [Q={Q}, E={self.router.anchor_emb.shape[1]}], got {tuple(qe.shape)}")
        seqs = [self.router.layout.suffix(t).ids for t in texts]
        by_len = np.argsort([len(s) for s in seqs], kind="stable")
        out = torch.empty(Q, T)
        step = max(1, self.max_rows // T) * self.pack  # queries per chunk (packed: T * step / pack rows)
        ev = self.router.evidence
        for lo in range(0, Q, step):
            rows = torch.from_numpy(by_len[lo : lo + step])
            chunk, chunk_qe = [seqs[i] for i in rows.tolist()], None if qe is None else qe[rows.to(qe.device)]
            if ev is not None and ev.lm_silent:  # the LM's logit counts for nothing: do not run it
                d = ev(chunk_qe, self.router.anchor_emb, profiles)  # [T, q]
                out[rows] = torch.sigmoid(d.float()).T.cpu()
                continue
            if self.shared_attention:
                d = decoder.shared_forward(self.router, stacked, seqs=chunk, qe=chunk_qe)  # [T, q]
            else:
                d = self._packed_forward(stacked, chunk, chunk_qe)  # [T, q]
            if ev is not None:
                d = ev.combine(d, ev(chunk_qe, self.router.anchor_emb, profiles))  # [T, q]
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
