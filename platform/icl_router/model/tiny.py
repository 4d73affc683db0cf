"""The router LM: loaded by path or hub id (``load_router_lm``), or a tiny Qwen2 built here.

A tiny router is a Qwen2 built from a config (random weights) plus a byte-level
BPE tokenizer trained in seconds on the given texts, with a ChatML chat template
and the special tokens the prompt needs. Both save and load with
``save_pretrained`` / ``from_pretrained`` (safetensors), exactly as a real
checkpoint such as Qwen/Qwen2.5-7B-Instruct does, so the rest of the code never
knows which one it holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from icl_router.model import prompt

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", prompt.PLACEHOLDER]
# Qwen2's pre-tokenizer split: the same word / number / newline boundaries as the real router.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 3000) -> Any:
    """A byte-level BPE tokenizer (Qwen2-style split) trained on ``texts`` plus the prompt strings.

    The prompt strings are repeated in the corpus so their words get merged early;
    "Yes" and "No", the answer tokens, are also added as whole-word tokens, so they
    stay single tokens however large and unlike the prompt the corpus is.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    prompt_texts = [prompt.SYSTEM, prompt.PERFORMANCE, prompt.QUESTION, prompt.STAGE1_SYSTEM, prompt.STAGE1_USER, "assistant user system", "Yes No " * 20]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*texts, *(prompt_texts * 50)], trainer)
    tok.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in (prompt.YES, prompt.NO)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", prompt.PLACEHOLDER],
    )
    fast.chat_template = CHATML_TEMPLATE
    for word in (prompt.YES, prompt.NO):
        if len(fast(word, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"the trained tokenizer splits {word!r}; raise vocab_size (now {vocab_size})")
    return fast


def tiny_qwen2(tokenizer: Any, *, hidden: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2, intermediate: int = 256, seed: int = 0) -> Any:
    """A randomly initialised Qwen2ForCausalLM sized for CPUs.

    vLLM's CPU backend needs a head size of 32, 64, 80, ...: keep hidden / heads >= 32.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    if hidden % heads or hidden // heads < 32:
        raise ValueError(f"hidden={hidden}, heads={heads}: head size must be an integer >= 32 (vLLM)")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def build_tiny_router_lm(texts: Iterable[str], *, vocab_size: int = 3000, seed: int = 0, **shape: int) -> tuple[Any, Any]:
    """(tiny Qwen2 LM, its tokenizer) from a corpus of query texts."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    return tiny_qwen2(tokenizer, seed=seed, **shape), tokenizer


def load_router_lm(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(causal LM, tokenizer) from a local directory or a hub id, with SDPA attention.

    The shared path for the tiny router saved by ``save_pretrained`` and for real
    checkpoints (e.g. Qwen/Qwen2.5-7B-Instruct on a GPU cluster). A tokenizer without the
    prompt's placeholder (or with ``Yes`` / ``No`` split) gets them added and the LM's
    embeddings grown (``model/vocab.py``); a router directory saved after that reloads as is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icl_router.model.vocab import prepare_router_lm

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    lm = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, attn_implementation="sdpa")
    prepare_router_lm(lm, tokenizer)
    return lm, tokenizer
