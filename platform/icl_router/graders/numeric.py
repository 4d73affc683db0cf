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


def grade_gsm8k(response: str, gold: str, *, plain: bool = False) -> float:
    answer = extract_answer(response, plain=plain)
    if answer is None:
        return 0.0
    got, want = first_number(answer), first_number(gold_number_text(gold))
    return float(got is not None and got == want)
