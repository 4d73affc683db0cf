"""The router as a library: query embedding (with an exact-text cache) and scoring against the pool.

One ``OnlineRouter`` per process that routes: the router deployment's replica, or an ingress
replica that scores in-process (no hop to another deployment). Pure Python + torch + numpy:
no Ray, so a Serve deployment, a bench or a test builds it the same way.

Scoring paths (``scoring``):
- ``full``: the cached-prefix scorer (routing/scorer.py), the router LM plus the evidence head;
- ``evidence``: the evidence head alone in numpy (routing/fast.py): no prefix caches, no
  tokenising, no torch per query. The same p as ``full`` when the router's LM is silent (its
  ``lm_weight`` stayed 0 in training); otherwise the LM's part is dropped, which the operator
  asks for knowingly (the evaluation's ``icl-router-evidence`` row says what it costs).
- ``auto`` (default): ``evidence`` when the router's LM is silent, else ``full``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from icl_router.kinds import Scoring


class Scored(NamedTuple):
    """What ``OnlineRouter.score`` gives for Q queries and the T pool ``models``."""

    models: list[str]
    p: np.ndarray  # [Q, T] float32: the router's p, moved toward the same-task rate on task rows
    mass: np.ndarray | None  # [Q] evidence mass at the temperature of each query's layer; None without a decision layer
    ms: dict  # stage times in ms: embed, score, cached
    task_rows: np.ndarray  # bool [Q]: routed by the decision layer's task layer (``decision.layer_input``)
    model_mass: np.ndarray | None = None  # [Q, T] each model's evidence mass with the evidence store's rows; None: no store
    emb: np.ndarray | None = None  # [Q, E] the query embeddings (None: the router reads text only)


class OnlineRouter:
    """Embeds and scores queries for one process; ``sync`` keeps its pool equal to the registry's."""

    def __init__(self, router_dir: str | Path, *, embedder: str | None = None, scoring: Scoring = "auto", threads: int = 1,
                 embed_cache: int = 4096, embed_dtype: str = "float32", device: str = "auto", dtype: str = "auto") -> None:
        import torch

        from icl_router import schemas
        from icl_router.data.embedder import REFERENCE, load_query_embedder, parse_embedder
        from icl_router.model.device import resolve
        from icl_router.model.router_dir import load_router_dir, read_anchor_queries
        from icl_router.routing.decision import DecisionParams

        torch.set_num_threads(max(1, threads))
        # the device rule: a replica that asked for a GPU loads the router there, in bfloat16 (model/device.py)
        self.device, self.dtype = resolve(device, dtype)
        loaded = load_router_dir(router_dir, device=self.device, dtype=self.dtype)
        self.meta = loaded.meta
        if scoring == "auto":
            ev = loaded.router.evidence
            scoring = "evidence" if ev is not None and ev.lm_silent and loaded.meta.query_input == "vector" else "full"
        self.scoring = scoring
        if scoring == "evidence":
            from icl_router.routing.fast import EvidenceScorer

            self.scorer = EvidenceScorer.from_router(loaded.router)  # raises without the evidence head
        elif scoring == "full":
            from icl_router.routing.scorer import Scorer

            self.scorer = Scorer(loaded.router)
        else:
            raise ValueError(f"scoring must be 'auto', 'full' or 'evidence', got {scoring!r}")
        # the decision layer reads the query's evidence mass: its cosine to every anchor embedding
        self.stored = DecisionParams.from_json(loaded.meta.decision) if loaded.meta.decision is not None else None
        self.decision = self.stored  # the layer for the current pool: its guard refitted when the pool is another
        self.evidence = SimpleNamespace(evidence=loaded.router.evidence, anchor_emb=loaded.router.anchor_emb)  # what refit_guard reads
        self.anchor_emb = loaded.router.anchor_emb.detach().float().cpu().numpy()  # [K, E]
        anchors = read_anchor_queries(router_dir)  # their tasks: a query naming one of them gets the task layer
        self.anchor_tasks = None if anchors is None else anchors.column(schemas.TASK).to_pylist()  # [K]
        self.query_emb = loaded.meta.query_input == "vector"  # the scorer reads the embedding (a text router reads the text)
        if scoring == "evidence" and not self.query_emb:
            raise ValueError("the evidence path reads query vectors: this router reads the query as text (query_input='text')")
        self.embedder, self.embedder_name, self.direct = None, None, False
        if self.query_emb or self.stored is not None:
            self.embedder_name = embedder or loaded.meta.embedder_name
            self.embedder = load_query_embedder(loaded.meta.embedder_name, embedder, where=f"router {router_dir}", threads=threads,
                                                device=str(self.device))
            if parse_embedder(self.embedder_name).variant == REFERENCE and self.device.type == "cpu":  # the direct call is a CPU shortcut
                self.direct = self._check_direct(embed_dtype)
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()  # exact query text -> embedding (LRU)
        self.cache_size = embed_cache
        self.profiles: dict[str, list[bool]] = {}  # what the scorer holds
        # the evidence store beside the anchors (routing/evidence_store.py): reloaded by ``sync`` when its generation moves
        self.router_dir, self.store, self.store_gen = Path(router_dir), None, ""
        self.store_scores = np.zeros((0, 0))  # [T, N] in the scorer's model order
        self.profile_matrix = np.zeros((0, len(self.anchor_emb)), dtype=bool)  # [T, K] in the scorer's model order: the task kernel's

    # ---- the pool -----------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return self.scorer.models

    def sync(self, routable: dict[str, list[bool]]) -> None:
        """Make the scorer's pool ``routable`` (model -> outcomes on the anchors): adds, replaces, removes;
        then the decision layer's guard for that pool (``decision_fit.refit_guard``); and the evidence
        store, when it was written since the last sync."""
        changed = self._sync_store()
        for m in [m for m in self.profiles if m not in routable]:
            self.scorer.remove(m)
            del self.profiles[m]
            changed = True
        for m, prof in routable.items():
            if self.profiles.get(m) != prof:
                self.scorer.add(m, np.array(prof, dtype=bool))  # full: one prefix forward
                self.profiles[m] = list(prof)
                changed = True
        if changed:
            self.profile_matrix = np.array([self.profiles[m] for m in self.scorer.models], dtype=bool).reshape(-1, len(self.anchor_emb))
            self.store_scores = self.store.matrix(self.scorer.models) if self.store is not None else np.zeros((0, 0))
        if changed and self.stored is not None:
            from icl_router.routing.decision_fit import fitted_here, refit_guard

            # the pool the layer was fitted on keeps it as stored, and so does any pool for a layer that
            # records none (one written by hand, say)
            here = fitted_here(self.stored, self.scorer.models)
            self.decision = self.stored if here else refit_guard(self.evidence, self.stored, profiles=self.profile_matrix, models=self.scorer.models,
                                                                anchor_tasks=self.anchor_tasks)

    def _sync_store(self) -> bool:
        """Reload the evidence store if its generation moved; whether it did."""
        from icl_router.routing import evidence_store

        gen = evidence_store.generation(self.router_dir)
        if gen == self.store_gen:
            return False
        self.store = evidence_store.load(self.router_dir, dim=self.anchor_emb.shape[1])
        self.store_gen = gen
        return True

    def _with_store(self, p: np.ndarray, mass: np.ndarray, emb: np.ndarray, task_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """p [Q, T] and each model's mass [Q, T] with the evidence store's outcomes (``evidence_store.combine``),
        at the temperature of each query's layer."""
        from icl_router.routing.evidence_store import combine, store_kernel

        sim = emb @ self.store.emb.T  # [Q, N]: both unit vectors
        out_p, out_m = np.array(p, dtype=np.float64), np.repeat(np.asarray(mass, dtype=np.float64)[:, None], p.shape[1], axis=1)
        for layer, rows in self.decision.row_layers(task_rows):
            E, W = store_kernel(sim[rows], self.store_scores, layer.tau)
            out_p[rows], out_m[rows] = combine(p[rows], mass[rows], E, W)
        return out_p, out_m

    # ---- queries ------------------------------------------------------------

    def _check_direct(self, embed_dtype: str) -> bool:
        """sentence-transformers: its modules called directly skip encode's per-call bookkeeping, if they agree."""
        import torch

        warm = ["warm up the embedder"]
        ref = self.embedder.encode(warm, normalize_embeddings=True, convert_to_numpy=True)
        ok = float(np.abs(self._forward(warm) - ref).max()) < 1e-5
        if ok and embed_dtype != "float32":
            self.embedder.to(getattr(torch, embed_dtype))  # bfloat16: moved vectors, opt-in
        return ok

    def _forward(self, texts: list[str], *, batch: int = 32) -> np.ndarray:
        import torch

        e = self.embedder
        prompt = e.prompts.get(e.default_prompt_name) if e.default_prompt_name else None
        # a batch pads every text to its longest: bulk calls (the Python API over a test set) go by length, in chunks
        order = np.argsort([len(t) for t in texts], kind="stable")
        parts = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                chunk = [texts[j] for j in order[i:i + batch]]
                v = e(e.preprocess(chunk, prompt=prompt))["sentence_embedding"].float()
                parts.append(torch.nn.functional.normalize(v, dim=-1).numpy())
        out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)  # [Q, E]
        out[order] = np.concatenate(parts)
        return out

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """([Q, E] unit vectors, how many came from the cache): each distinct text embedded once."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            enc = self._forward(missing) if self.direct else self.embedder.encode(missing, normalize_embeddings=True, convert_to_numpy=True)
            for t, v in zip(missing, enc):
                self.cache[t] = np.asarray(v, dtype=np.float32)
        out = np.stack([self.cache[t] for t in texts])
        for t in texts:
            self.cache.move_to_end(t)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return out, len(texts) - len(missing)

    def score(self, texts: Sequence[str], *, tasks: Sequence[str | None] | None = None) -> Scored:
        """The pool's p for ``texts`` (and the task each names, None where not named) through the
        decision layer's input (``Scored``); the decision layer itself is the policy's step."""
        from icl_router.routing.decision import cosine, layer_input

        t0 = time.perf_counter()
        models = self.scorer.models
        none = np.zeros(len(texts), dtype=bool)
        if not models:
            return Scored([], np.zeros((len(texts), 0), dtype=np.float32), None, {}, none)
        emb, cached = self.embed(texts) if self.embedder is not None else (None, 0)  # [Q, E]
        t1 = time.perf_counter()
        if self.scoring == "evidence":
            sim = self.scorer.similarity(emb)  # [Q, K], shared with the evidence mass
            p = self.scorer.score(query_emb=emb, models=models, sim=sim)
        else:
            sim = None
            p = self.scorer.score(list(texts), query_emb=emb if self.query_emb else None, models=models)  # [Q, T]
        mass, task_rows, model_mass = None, none, None
        if self.decision is not None:
            li = layer_input(p, cosine(emb, self.anchor_emb) if sim is None else sim, params=self.decision, profiles=self.profile_matrix,
                             query_tasks=tasks, anchor_tasks=self.anchor_tasks)
            p, mass, task_rows = li.p.astype(np.float32), li.mass, li.task_rows
            if self.store is not None and self.store.n and self.store_scores.shape == (len(models), self.store.n):
                p, model_mass = self._with_store(p, mass, emb, task_rows)
                p = p.astype(np.float32)
        t2 = time.perf_counter()
        ms = {"embed": round((t1 - t0) * 1e3, 3), "score": round((t2 - t1) * 1e3, 3), "cached": cached}
        return Scored(models, p, mass, ms, task_rows, model_mass, emb)

    def nearest(self, text: str, k: int = 5) -> list[tuple[int, float]]:
        """(anchor position, cosine) of the ``k`` anchors nearest ``text``, nearest first (its embedding from the
        cache when it was just scored); [] for a router that embeds no query (a text router without a decision layer)."""
        if self.embedder is None or k <= 0:
            return []
        from icl_router.routing.decision import cosine

        emb, _ = self.embed([text])
        sim = cosine(emb, self.anchor_emb)[0]
        top = np.argsort(-sim, kind="stable")[:k]
        return [(int(i), round(float(sim[i]), 4)) for i in top]
