"""The ICL-Router prompt, token for token, cut at the point where queries differ.

Stage 2 (docs/design.md §1, the authors' released prompt, Qwen chat format)::

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n
    <|im_start|>user\\nModel's Performance:\\n<ph>Yes<ph>No...<ph>Yes      <- PREFIX (one per model)
    \\n\\n{query}\\n\\n{QUESTION}<|im_end|>\\n<|im_start|>assistant\\n         <- SUFFIX (one per query)
    Yes|No                                                               <- the answer token

``<ph>`` is the placeholder token (``<|fim_pad|>``) whose input embedding the
router replaces with a projected vector. Options:

- ``query_input="vector"``: the query is one placeholder slot instead of its text.
- ``profile_layout="fused"``: one slot per anchor, no label token; the router
  adds the label token's embedding onto the anchor's slot (half the prefix).

The segments concatenate to exactly ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`` of the same text (tests/unit/test_model.py).
The cut after the profile is safe for byte-level BPE: the profile ends with a
label word or a special token and the suffix starts with a newline, which the
pre-tokenizer never merges with either.

Stage 1 (the authors' query-reconstruction prompt, one fixed instruction)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nHere is a query embedding: <ph>\\n\\nWhat's the content of it?<|im_end|>\\n
    <|im_start|>assistant\\n{query}<|im_end|>      <- loss on these tokens only
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from icl_router.kinds import ProfileLayout, QueryInput

SYSTEM = (
    "You are a helpful assistant. Your task is to judge whether a model can answer a query based on its "
    'historical performance across many queries: "Yes" means it answered correctly, "No" means it did not.'
)
PERFORMANCE = "Model's Performance:\n"
QUESTION = 'Indicate whether the model is capable of answering this query by responding with "Yes" or "No".'
YES, NO = "Yes", "No"
PLACEHOLDER = "<|fim_pad|>"

STAGE1_SYSTEM = "You are a helpful assistant."
STAGE1_USER = "Here is a query embedding: {ph}\n\nWhat's the content of it?"

QUERY = -1  # slot source of the query vector; anchor slots use the anchor's index 0..K-1


@dataclass(frozen=True)
class Segment:
    """Token ids with vector slots: ``ids[slot_pos[j]]`` is the placeholder that takes
    vector ``slot_src[j]`` (an anchor index, or ``QUERY``)."""

    ids: list[int]
    slot_pos: list[int]
    slot_src: list[int]

    def __add__(self, other: Segment) -> Segment:
        n = len(self.ids)
        return Segment(self.ids + other.ids, self.slot_pos + [n + p for p in other.slot_pos], self.slot_src + other.slot_src)


def user_text(profile: str, query: str) -> str:
    return f"{PERFORMANCE}{profile}\n\n{query}\n\n{QUESTION}"


class PromptLayout:
    """Tokenises the stage-1 and stage-2 prompts for one tokenizer and one layout.

    ``prefix(labels)`` is identical for all queries of a model; ``suffix(query)`` ends
    right before the answer token; ``yes_id`` / ``no_id`` are the answer tokens.
    """

    def __init__(self, tokenizer: Any, *, query_input: QueryInput = "text", profile_layout: ProfileLayout = "pairs", placeholder: str = PLACEHOLDER) -> None:
        if query_input not in get_args(QueryInput):
            raise ValueError(f"query_input={query_input!r}: expected one of {get_args(QueryInput)}")
        if profile_layout not in get_args(ProfileLayout):
            raise ValueError(f"profile_layout={profile_layout!r}: expected one of {get_args(ProfileLayout)}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the router tokenizer has no chat_template; the prompt is defined by the chat format")
        self.tokenizer = tokenizer
        self.query_input, self.profile_layout = query_input, profile_layout
        self.placeholder_id = self._single_token(placeholder, "placeholder")
        self.yes_id, self.no_id = self._single_token(YES, "label"), self._single_token(NO, "label")
        # Render once with markers, then cut the text where the profile and the query go.
        mark_p, mark_q = "\x00PROFILE\x00", "\x00QUERY\x00"
        text = self._render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text(mark_p, mark_q)}])
        head, rest = text.split(mark_p)
        between, self._tail = rest.split(mark_q)
        if between != "\n\n":
            raise ValueError(f"unexpected chat template: {between!r} between profile and query")
        self._head = self._encode(head)
        s1_head, s1_tail = self._render(
            [{"role": "system", "content": STAGE1_SYSTEM}, {"role": "user", "content": STAGE1_USER.format(ph=mark_q)}]
        ).split(mark_q)
        self._stage1 = self._encode(s1_head + placeholder + s1_tail)
        self._eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _single_token(self, text: str, what: str) -> int:
        ids = self._encode(text)
        if len(ids) != 1:
            raise ValueError(
                f"{what} {text!r} must be a single token of the router tokenizer, got {len(ids)} tokens {ids}; "
                "load the router with model.tiny.load_router_lm, which adds it (model/vocab.py)"
            )
        return ids[0]

    def prefix(self, labels: Sequence[bool]) -> Segment:
        """Everything through the profile: system, header, K anchor slots (+ label tokens in ``pairs``)."""
        ids, pos = list(self._head), []
        for y in labels:
            pos.append(len(ids))
            ids.append(self.placeholder_id)
            if self.profile_layout == "pairs":
                ids.append(self.yes_id if y else self.no_id)
        return Segment(ids, pos, list(range(len(labels))))

    def suffix(self, query: str) -> Segment:
        """The query part, the question and the assistant header; the answer comes next."""
        body = PLACEHOLDER if self.query_input == "vector" else query
        ids = self._encode("\n\n" + body + self._tail)
        pos = [i for i, t in enumerate(ids) if t == self.placeholder_id]
        if len(pos) != (self.query_input == "vector"):
            raise ValueError(f"query text contains the placeholder token {PLACEHOLDER!r}; remove it: {query[:80]!r}")
        return Segment(ids, pos, [QUERY] * len(pos))

    def prompt(self, labels: Sequence[bool], query: str) -> Segment:
        """The whole stage-2 prompt (prefix + suffix), as the naive per-pair path feeds it."""
        return self.prefix(labels) + self.suffix(query)

    def stage1(self, query: str) -> tuple[Segment, int]:
        """Stage-1 prompt + the query text + eos; returns (segment, number of prompt tokens)."""
        target = self._encode(query) + self._eos
        if self.placeholder_id in target:
            raise ValueError(f"query text contains the placeholder token {PLACEHOLDER!r}; remove it: {query[:80]!r}")
        pos = self._stage1.index(self.placeholder_id)
        return Segment(self._stage1 + target, [pos], [QUERY]), len(self._stage1)
