"""The prompt's own tokens in any router tokenizer: added where missing, the LM's embeddings grown.

The layout (``model/prompt.py``) needs three strings to be one token each: the
placeholder whose input embedding a projected vector replaces, and the answers
``Yes`` / ``No``. Qwen2.5 (the paper's router) and the tiny tokenizer have all
three; SmolLM2 (Llama), Gemma 3 and most others lack ``<|fim_pad|>``.

``add_prompt_tokens`` adds what a tokenizer lacks (the placeholder as a special
token; a split ``Yes`` / ``No`` as a whole-word token), and ``fit_prompt_tokens``
then grows the LM's embeddings to the tokenizer. How a new row starts:

- the placeholder: the mean of the input-embedding rows of the original vocabulary
  (the row is overwritten by a projected vector wherever it is used; the mean keeps it
  at an ordinary scale for the tied output head and for anything that reads it bare);
- ``Yes`` / ``No`` (only where the tokenizer split them): the mean of the rows of the
  pieces it split the word into, so the new token starts near what the word meant.

Tied output heads follow the input rows; an untied head's new rows start at the mean
of its own rows. The added tokens are saved with the tokenizer (``save_pretrained``)
and the grown LM saves its new vocabulary size, so an exported router directory
reloads with the same ids and nothing is added again.
"""

from __future__ import annotations

from typing import Any

import torch

from icl_router.model import prompt


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def add_prompt_tokens(tokenizer: Any, *, placeholder: str = prompt.PLACEHOLDER) -> dict[str, list[int]]:
    """Add the placeholder / ``Yes`` / ``No`` where ``tokenizer`` does not hold them as one token.

    Returns ``{added string: the ids it encoded to before}`` (empty: nothing added). The
    same tokenizer always gets the same new ids (appended in this order)."""
    from tokenizers import AddedToken

    added: dict[str, list[int]] = {}
    if len(_ids(tokenizer, placeholder)) != 1:
        added[placeholder] = _ids(tokenizer, placeholder)
        tokenizer.add_tokens([AddedToken(placeholder, special=True, normalized=False)], special_tokens=True)
    for word in (prompt.YES, prompt.NO):
        if len(_ids(tokenizer, word)) != 1:
            added[word] = _ids(tokenizer, word)
            tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=False)])
    for text in added:
        if len(_ids(tokenizer, text)) != 1:
            raise ValueError(f"could not make {text!r} a single token of the router tokenizer ({type(tokenizer).__name__})")
    return added


def fit_prompt_tokens(lm: Any, tokenizer: Any, added: dict[str, list[int]]) -> None:
    """Grow ``lm``'s embeddings to ``len(tokenizer)`` and initialise the rows of ``added``
    (``add_prompt_tokens``' result) as the module docstring says."""
    emb = lm.get_input_embeddings()
    old = emb.weight.shape[0]
    if len(tokenizer) > old:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if not added:
        return
    head = lm.get_output_embeddings()
    tied = head is None or head.weight is lm.get_input_embeddings().weight
    with torch.no_grad():
        for part in (lm.get_input_embeddings().weight, *(() if tied else (head.weight,))):
            mean = part[:old].float().mean(0)
            for text, pieces in added.items():
                new_id = _ids(tokenizer, text)[0]
                pieces = [i for i in pieces if i < old]
                row = part[pieces].float().mean(0) if text != prompt.PLACEHOLDER and pieces else mean
                part[new_id] = row.to(part.dtype)


def prepare_router_lm(lm: Any, tokenizer: Any) -> dict[str, list[int]]:
    """``add_prompt_tokens`` then ``fit_prompt_tokens``: the router LM and tokenizer, ready for the layout."""
    added = add_prompt_tokens(tokenizer)
    fit_prompt_tokens(lm, tokenizer, added)
    return added
