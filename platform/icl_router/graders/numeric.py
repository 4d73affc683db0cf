"""GSM8K: the first number of the answer against the gold's, as ZeroEval's gsm_eval.py does."""

from __future__ import annotations

import re

from icl_router.graders.extract import extract_answer

NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _sanitize(answer: str) -> str:
    answer = answer.replace("$", "").strip().replace(",", "")
    # "3/4" -> "0.75"; ZeroEval evals any answer with a slash, we only plain arithmetic (no "**")
    if "/" in answer and "**" not in answer and re.fullmatch(r"[\d\s.+\-*/()]+", answer):
        try:
            answer = str(float(eval(answer, {"__builtins__": {}})))  # digits and operators only
        except (ArithmeticError, SyntaxError):
            pass
    return answer


def gold_number_text(gold: str) -> str:
    """GSM8K gold in any of its spellings: "18", "# 18", or a full solution ending "#### 18"."""
    return gold.rsplit("####", 1)[1] if "####" in gold else gold.replace("#", "")


def first_number(text: str) -> float | None:
    m = NUMBER.search(_sanitize(text))
    return float(m.group()) if m else None


_CUE = re.compile(r"(?:answer is|####)\s*:?", re.IGNORECASE)
SHORT_REPLY_WORDS = 5


def plain_number(text: str) -> float | None:
    """The number a reply asked for "the final number only" gives: the first number after its last
    "answer is" / "####", else the last number of a reply of a few words ("10", "$330", "10 hours").
    A longer reply without the cue gives none: a small model working it out in words, cut off by
    max_tokens, ends on whatever quantity it was at, which matches the gold by chance."""
    cues = list(_CUE.finditer(text))
    if cues:
        return first_number(text[cues[-1].end():])
    if len(text.split()) <= SHORT_REPLY_WORDS:
        found = list(NUMBER.finditer(_sanitize(text)))
        return float(found[-1].group()) if found else None
    return None


def grade_gsm8k(response: str, gold: str, *, plain: bool = False) -> float:
    """``plain``: the whole response is the answer, read by ``plain_number``; else ZeroEval's answer
    field, read by its first number."""
    answer = extract_answer(response, plain=plain)
    if answer is None:
        return 0.0
    got, want = (plain_number if plain else first_number)(answer), first_number(gold_number_text(gold))
    return float(got is not None and got == want)
