"""Anchor evidence: a model's outcomes on the anchors nearest the query, as a logit.

The profile a router reads in context is also a labelled neighbourhood: the K anchors
carry embeddings and the model's right/wrong record on them. Averaging the record over
the anchors most similar to the query is kNN routing on the profile alone, and it routes
about as well as kNN over the whole train set although it sees only the anchors a new
model is profiled on (docs/results.md). With ``router.anchor_evidence`` this logit is
added to the router LM's logit(Yes) - logit(No): the LM learns what the neighbourhood
misses, and a model added by its profile gets the evidence as any trained model does.
"""

from __future__ import annotations

import torch
from torch import nn

TAUS = (0.03, 0.1, 0.3)  # softmax temperatures over cosine similarity: ~5, ~30 and ~all anchors
CLIP = 0.02  # outcome rates are clipped to [CLIP, 1 - CLIP] before the logit


class AnchorEvidence(nn.Module):
    """w . f + b, f = [logit of the softmax(cos / tau)-weighted outcome rate per tau, logit of the profile's rate].

    Starts as the middle temperature alone (w = e_1, b = 0), so an untrained router already
    routes like kNN over the anchors and training moves it from there. ``lm_weight`` scales the
    router LM's logit before the two are added (``combine``); it starts at 0, so the untrained
    router is the evidence alone, and the LM speaks only as far as training makes it useful.
    A router whose LM weight stayed 0 can be scored without running the LM at all.
    """

    def __init__(self) -> None:
        super().__init__()
        init = torch.zeros(len(TAUS) + 1)
        init[1] = 1.0
        self.weight = nn.Parameter(init)
        self.bias = nn.Parameter(torch.zeros(1))  # [1], not a 0-dim tensor: ZeRO flattens parameters
        self.lm_weight = nn.Parameter(torch.zeros(1))  # [1]; Adam moves it off 0 from the first step
        self.register_buffer("taus", torch.tensor(TAUS), persistent=False)

    def forward(self, query_emb: torch.Tensor, anchor_emb: torch.Tensor, profiles: torch.Tensor) -> torch.Tensor:
        """query_emb [Q, E], anchor_emb [K, E], profiles bool [T, K] -> logit [T, Q] for every (model, query)."""
        w = self.weight
        q = nn.functional.normalize(query_emb.to(w), dim=-1)
        a = nn.functional.normalize(anchor_emb.to(w), dim=-1)
        y = profiles.to(w)  # [T, K]
        sim = q @ a.T  # [Q, K]
        att = torch.softmax(sim[None] / self.taus[:, None, None], dim=-1)  # [F-1, Q, K]
        rates = torch.cat([att @ y.T, y.mean(1).expand(1, len(q), -1)])  # [F, Q, T]
        f = torch.logit(rates.clamp(CLIP, 1 - CLIP))  # [F, Q, T]
        return torch.einsum("f,fqt->tq", w, f) + self.bias  # [T, Q]

    def combine(self, lm_logit: torch.Tensor, evidence_logit: torch.Tensor) -> torch.Tensor:
        """The router's logit: the LM's, scaled by ``lm_weight``, plus the evidence's (same shapes)."""
        return self.lm_weight.to(lm_logit) * lm_logit + evidence_logit

    @property
    def lm_silent(self) -> bool:
        """True when the LM's logit counts for nothing (its weight is exactly 0)."""
        return bool(self.lm_weight.detach().abs().max() == 0)

    def pairs(self, query_emb: torch.Tensor, anchor_emb: torch.Tensor, profiles: torch.Tensor, model_idx: torch.Tensor) -> torch.Tensor:
        """The logit of pair i = (query i, model ``model_idx[i]`` of profiles [M, K]) -> [N]."""
        cross = self(query_emb, anchor_emb, profiles)  # [M, N]
        return cross[model_idx.to(cross.device), torch.arange(len(query_emb), device=cross.device)]
