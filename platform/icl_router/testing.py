"""Helpers for tests and benchmarks that need real artefacts without a hub (no network here)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

# Queries of different shapes and lengths for model / scorer tests.
SAMPLE_QUERIES = [
    "What is 2+2?",
    "Name the capital city of France.",
    "Write a python function that returns the sorted list of primes below n.",
    "Why does water boil at a lower temperature on a mountain?",
    "A triangle has sides 3, 4 and 5. What is its area?",
]


def full_forward_p(router, profiles, query_emb, queries):  # noqa: ANN001
    """p(Yes) [Q, T] from the naive per-pair prompts (the prefix recomputed for every pair):
    the reference the cached paths must equal."""
    import torch

    from icl_router.train.steps import collate_stage2

    Q, T = len(queries), len(profiles)
    batch = collate_stage2(
        router.layout,
        list(queries) * T,
        model_idx=[t for t in range(T) for _ in range(Q)],
        profiles=profiles,
        target=[0.0] * (T * Q),
        query_emb=None if query_emb is None else query_emb.repeat(T, 1),
    )
    with torch.no_grad():
        return torch.sigmoid(router.forward_pairs(batch.pairs)).view(T, Q).T


# Enough words, digits and JSON punctuation for a tokenizer that can spell the profile prompts.
DEFAULT_TEXTS = [
    "Answer the question. Reply with a JSON object with the keys reasoning and answer.",
    '{"reasoning": "First add the numbers, then divide.", "answer": "42"}',
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . : ; ' \"",
    "Which option is correct? A B C D. What is the sum of the three-digit numbers?",
]


def make_tiny_causal_lm(path: str | Path, *, seed: int = 0, texts: Iterable[str] = ()) -> Path:
    """Save a randomly initialised tiny Qwen2 (hidden 128, 4 heads of 32, 2 layers; vLLM CPU needs
    head size >= 32) with a byte-level BPE tokenizer trained on ``texts`` and a ChatML template."""
    import torch

    from icl_router.model.tiny import build_tiny_router_lm

    path = Path(path)
    lm, tokenizer = build_tiny_router_lm([*DEFAULT_TEXTS, *texts], vocab_size=3000, seed=seed)
    # With the usual init (std 0.02) and tied embeddings the residual stream is the input
    # embedding, so greedy decoding repeats the last prompt token ("\n") for every seed and
    # prompt. Std 0.1 makes answers differ between seeds and prompts, as two real models do.
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A self-contained routing service for tests and benchmarks: a tiny router directory with random
# weights (the plumbing, not routing quality, is what it exercises) and two tiny vLLM pool models.
TINY_POOL = {"tiny-a": 0.01, "tiny-b": 0.001}  # name -> cost
TINY_TEXTS = ["What is the sum of 17 and 25?", "Write a Python function that reverses a list.", "Who wrote Hamlet?"]


def tiny_profile(k: int) -> np.ndarray:
    """The profile of tiny-a in a tiny router directory: a fixed draw, about half right."""
    import numpy as np

    return np.random.RandomState(0).rand(k) < 0.5


def tiny_anchors(k: int, *, golds: list[str] | None = None, grader: str | None = "exact_match") -> pa.Table:
    """The rows of a tiny router directory's anchors.parquet: ``anchor-<i>``, a short arithmetic question,
    ``golds`` (default: the right sums) graded by ``grader`` (None: ungradable anchors)."""
    import pyarrow as pa

    from icl_router import schemas as S

    golds = golds if golds is not None else [str(2 * i + 1) for i in range(k)]
    return pa.table({
        S.QUERY_ID: [f"anchor-{i}" for i in range(k)], S.POSITION: pa.array(range(k), pa.int32()),
        S.TEXT: [f"What is {i} plus {i + 1}?" for i in range(k)], S.TASK: ["arithmetic"] * k,
        S.GOLD: golds, S.GRADER: [grader] * k,
    }, schema=S.ROUTER_ANCHORS_SCHEMA)


def make_tiny_router_dir(
    path: str | Path, *, k: int = 8, decision: dict | None = None, texts: Iterable[str] = TINY_TEXTS, both: bool = False,
    anchors: pa.Table | None = None,
) -> Path:
    """A vector-query router directory (random weights, random anchor embeddings, anchor evidence) whose
    pool holds tiny-a's profile (``both``: tiny-b's too, half right); ``decision``: a DecisionParams.to_json();
    ``anchors``: its anchors.parquet (default ``tiny_anchors(k)``)."""
    import numpy as np
    import torch

    from icl_router.model.prompt import PromptLayout
    from icl_router.model.router import ICLRouter
    from icl_router.model.router_dir import RouterMeta, save_router_dir, write_anchor_queries
    from icl_router.model.tiny import build_tiny_router_lm

    lm, tok = build_tiny_router_lm(list(texts), seed=0)
    layout = PromptLayout(tok, query_input="vector", profile_layout="pairs")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(k, 384), anchor_evidence=True)
    meta = RouterMeta(
        embedder="all-MiniLM-L6-v2", embedding_dim=384, query_input="vector", profile_layout="pairs",
        placeholder_id=layout.placeholder_id, yes_id=layout.yes_id, no_id=layout.no_id,
        anchor_query_ids=[f"anchor-{i}" for i in range(k)], anchor_evidence=True, decision=decision,
    )
    pool = {"tiny-a": tiny_profile(k), **({"tiny-b": np.arange(k) % 2 == 0} if both else {})}
    path = save_router_dir(router, Path(path), meta=meta, pool=pool)
    write_anchor_queries(path, anchors if anchors is not None else tiny_anchors(k))
    return path


def tiny_serve_config(root: str | Path, *, k: int = 8, decision: dict | None = None, both: bool = False, **fields: object) -> object:
    """A ServeConfig over a tiny router directory and the TINY_POOL models, all written under ``root``
    (``both``: both models routable from the start); ``fields``: more ServeConfig fields (port, auth, ...)."""
    from icl_router.config import AutoscalingConfig, PoolModelConfig, ScorerServeConfig, ServeConfig

    root = Path(root)
    pool = [
        PoolModelConfig(
            name=name, path=str(make_tiny_causal_lm(root / name, seed=i, texts=TINY_TEXTS)), cost=cost,
            engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=8),
        )
        for i, (name, cost) in enumerate(TINY_POOL.items())
    ]
    router = fields.pop("router", None) or ScorerServeConfig(path=str(make_tiny_router_dir(root / "router", k=k, decision=decision, both=both)), num_cpus=1)
    return ServeConfig(router=router, pool=pool, **fields)
