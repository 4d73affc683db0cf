"""Short-answer QA: SQuAD's exact match and token F1 after its normalisation, best over the
gold aliases (a string, a list, or {"answers": [...]})."""

from __future__ import annotations

import collections
import re
import string

from icl_router.graders.extract import extract_answer


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _aliases(gold: str | list | dict) -> list[str]:
    if isinstance(gold, dict):
        gold = gold["answers"]
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


def _prediction(response: str, *, plain: bool = False) -> str:
    answer = extract_answer(response, plain=plain)
    return answer if answer is not None else response


def f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def grade_exact_match(response: str, gold: str | list | dict, *, plain: bool = False) -> float:
    pred = normalize_answer(_prediction(response, plain=plain))
    return float(any(pred == normalize_answer(g) for g in _aliases(gold)))


def grade_f1(response: str, gold: str | list | dict, *, plain: bool = False) -> float:
    pred = _prediction(response, plain=plain)
    return max(f1(pred, g) for g in _aliases(gold))
