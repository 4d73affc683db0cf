"""Multiple choice: the option letter in the answer field (or the response) against the gold's."""

from __future__ import annotations

import re

from icl_router.graders.extract import extract_answer

LETTERS = "ABCDEFGHIJ"
_PATTERNS = (  # most explicit first; letters are case-sensitive ("answer is a bit..." is no A)
    r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-J])\b(?![-'])",  # "Answer: B", "answer is (B)"
    r"^\(([A-J])\)",  # "(B) text"
    r"^([A-J])(?:[.:)]|$)",  # "B", "B)", "B. text", "B: text"
    r"\(([A-J])\)",  # "... so (B)"
)


def extract_letter(text: str) -> str | None:
    text = text.strip().strip("*").strip()
    for pattern in _PATTERNS:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def gold_letter(gold: str | int | dict) -> str:
    """A letter, a 0-based index, or {"choices": [...], "answer": choice text or letter}."""
    if isinstance(gold, dict):
        answer = gold["answer"]
        if isinstance(answer, str) and answer in gold.get("choices", []):
            return LETTERS[gold["choices"].index(answer)]
        return gold_letter(answer)
    if isinstance(gold, int) or str(gold).strip().isdigit():
        return LETTERS[int(gold)]
    letter = extract_letter(str(gold))
    if letter is None:
        raise ValueError(f"multiple_choice gold {gold!r} is not a letter A-J, an index or a choices dict")
    return letter


def grade_multiple_choice(response: str, gold: str | int | dict, *, plain: bool = False) -> float:
    answer = extract_answer(response, plain=plain)
    return float(extract_letter(answer if answer is not None else response) == gold_letter(gold))
