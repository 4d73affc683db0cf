"""The evidence-only scorer: p(Yes) from the anchor-evidence head alone, in numpy, no LM forward.

When a router's LM adds nothing to the evidence (its validation kept the untrained LM, or
the serving config asks for it), a query's score is the evidence head's logit
(model/evidence.py) over the registered profiles. Everything that does not depend on the
query is computed once per pool version (when a model is added or removed): the
normalised anchors, the profiles as a float matrix, and each model's profile-rate feature.
A query then costs one [Q, K] similarity, three softmaxes and three [Q, K] x [K, T]
products. The similarities are returned too, for the decision layer's evidence mass.

Same public API as routing/scorer.py's Scorer (``models``, ``add``, ``remove``, ``score``),
and the same p as the evidence head in float64 (tests/unit/test_fast_scorer.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

CLIP = 0.02  # model/evidence.py CLIP: rates are clipped before the logit


class EvidenceScorer:
    """p(Yes) of queries against the registered models from the anchor evidence alone.

    ``weight`` [len(taus) + 1] and ``bias`` are the evidence head's (the last feature is the
    profile's rate). Thread-safe like Scorer: ``add`` / ``remove`` swap a snapshot under a lock.
    """

    def __init__(self, anchor_emb: np.ndarray, weight: np.ndarray, bias: float, taus: Sequence[float],
                 pool: dict[str, np.ndarray] | None = None, *, clip: float = CLIP) -> None:
        a = np.asarray(anchor_emb, dtype=np.float64)
        self.anchors = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # [K, E]
        self.k = len(a)
        self.weight = np.asarray(weight, dtype=np.float64)  # [F]
        self.bias = float(bias)
        self.inv_taus = 1.0 / np.asarray(taus, dtype=np.float64)  # [F-1]
        if self.weight.shape != (len(self.inv_taus) + 1,):
            raise ValueError(f"weight must hold one value per tau and one for the profile rate: {len(self.inv_taus) + 1}, got {self.weight.shape}")
        self.clip = clip
        self._lock = threading.Lock()
        self._profiles: dict[str, np.ndarray] = {}
        self._stacked: tuple[list[str], np.ndarray, np.ndarray] | None = None
        for m, prof in (pool or {}).items():
            self.add(m, prof)

    @classmethod
    def from_router(cls, router, pool: dict[str, np.ndarray] | None = None) -> EvidenceScorer:
        """From an ICLRouter with the evidence head (model/router.py, ``anchor_evidence``).

        The router's p exactly when its LM is silent (``lm_weight`` 0); otherwise the LM's part is left out."""
        ev = router.evidence
        if ev is None:
            raise ValueError("this router has no anchor-evidence head (router.anchor_evidence: false): the evidence-only path needs one")
        return cls(router.anchor_emb.detach().double().cpu().numpy(), ev.weight.detach().double().cpu().numpy(),
                   float(ev.bias.detach().double().cpu()[0]), ev.taus.tolist(), pool)

    @property
    def models(self) -> list[str]:
        with self._lock:
            return list(self._profiles)

    def add(self, model_id: str, profile: np.ndarray | Sequence[bool]) -> None:
        prof = np.asarray(profile)
        if prof.shape != (self.k,):
            raise ValueError(f"profile of {model_id!r} must hold one outcome per anchor: shape ({self.k},), got {prof.shape}")
        with self._lock:
            self._profiles[model_id] = prof.astype(bool)
            self._stacked = None

    def remove(self, model_id: str) -> None:
        with self._lock:
            if model_id not in self._profiles:
                raise KeyError(f"model {model_id!r} is not registered; registered: {list(self._profiles)}")
            del self._profiles[model_id]
            self._stacked = None

    def _snapshot(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(models, profiles [K, T] float64, the query-independent part of the logit [T]) for this pool version."""
        with self._lock:
            if self._stacked is None:
                order = list(self._profiles)
                if not order:
                    raise ValueError("the pool is empty: register at least one model before scoring")
                y = np.stack([self._profiles[m] for m in order], axis=1).astype(np.float64)  # [K, T]
                rate = _logit(np.clip(y.mean(0), self.clip, 1 - self.clip))  # [T]
                self._stacked = (order, y, self.weight[-1] * rate + self.bias)
            return self._stacked

    def similarity(self, query_emb: np.ndarray) -> np.ndarray:
        """Cosine of each query to each anchor, [Q, K] float64."""
        q = np.asarray(query_emb, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.anchors.shape[1]:
            raise ValueError(f"query_emb must be [Q, E={self.anchors.shape[1]}], got {q.shape}")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q @ self.anchors.T

    def score(self, texts: Sequence[str] | None = None, *, query_emb: np.ndarray, models: Sequence[str] | None = None,
              sim: np.ndarray | None = None) -> np.ndarray:
        """p(Yes) float32 [Q, T] against ``models`` (default: all, registration order); ``texts`` unused (Scorer's API).

        ``sim`` [Q, K]: the queries' cosine to the anchors when the caller has it already.
        """
        order, y, const = self._snapshot()
        if models is not None:
            pos = {m: i for i, m in enumerate(order)}
            unknown = [m for m in models if m not in pos]
            if unknown:
                raise KeyError(f"models {unknown} are not registered; registered: {order}")
            idx = [pos[m] for m in models]
            y, const = y[:, idx], const[idx]
        s = self.similarity(query_emb) if sim is None else sim  # [Q, K]
        z = np.zeros((len(s), y.shape[1])) + const  # [Q, T]
        for w, inv_tau in zip(self.weight[:-1], self.inv_taus):
            if w == 0.0:
                continue  # an untrained head weighs one temperature only
            e = np.exp((s - s.max(1, keepdims=True)) * inv_tau)  # [Q, K] softmax numerator
            rate = (e @ y) / e.sum(1, keepdims=True)  # [Q, T]
            z += w * _logit(np.clip(rate, self.clip, 1 - self.clip))
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)
