"""Helpers for tests and benchmarks that need real artefacts without a hub (no network here)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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
