"""CRUXEval output prediction: the predicted literal against the true output.

ZeroEval (crux_eval.py) compares strings: the answer with surrounding quotes stripped and
newlines written as ``\\n`` against the gold repr with its quotes stripped. With
``literal=True`` an answer whose ``ast.literal_eval`` value ``==`` the gold's also matches
("[1,2]" vs "[1, 2]", "{'b': 2, 'a': 1}" vs "{'a': 1, 'b': 2}"), which is CRUXEval's own rule
(it runs ``assert f(x) == answer``); ZeroEval's published figures use the default.
"""

from __future__ import annotations

import ast
import warnings

from icl_router.graders.extract import extract_answer


def _literal(text: str):
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and the like on model text
            warnings.simplefilter("ignore", SyntaxWarning)
            return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def grade_crux(response: str, gold: str, *, literal: bool = False, plain: bool = False) -> float:
    answer = extract_answer(response, plain=plain)
    if answer is None:
        return 0.0
    if answer.strip("'\"").replace("\n", "\\n") == gold.strip("'\""):
        return 1.0
    if literal:
        (ok_a, a), (ok_g, g) = _literal(answer), _literal(gold)
        try:
            return float(ok_a and ok_g and bool(a == g))
        except Exception:  # == on odd values (nan containers, deep nesting)
            return 0.0
    return 0.0
