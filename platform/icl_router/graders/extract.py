"""Pull the model's final answer out of a response, the way ZeroEval does.

ZeroEval asks for a JSON object with "reasoning" and "answer". Its scorers (src/evaluation/
eval_utils.py, gsm_eval.py, math_eval.py, crux_eval.py) take the *first* balanced {...} of the
response and json-load it with newlines removed (if that object is not valid JSON they do not
look further); failing that, a regex for the "answer" value (quoted, then unquoted); failing
that, for Llama-3.1 only, the first ``\\boxed{word}``. We apply the boxed fallback to every model
(a grader does not know the model) and take the last balanced ``\\boxed{...}``: on the 15
published generation files this changes one answer (Phi-3.5 math-l5 #30, boxed without JSON).
"""

from __future__ import annotations

import json
import re


def first_json_object(text: str) -> dict | None:
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                try:
                    obj = json.loads(text[start : i + 1].replace("\n", ""))
                except json.JSONDecodeError:
                    return None
                return obj if isinstance(obj, dict) else None
    return None


def json_field(text: str, key: str) -> str | None:
    """ZeroEval's regex fallback for a broken JSON object: quoted value, then unquoted."""
    for pattern, flags in ((rf'"{key}"\s*:\s*"([^"]*?)"', 0), (rf'"{key}"\s*:\s*"(.*?)"', re.DOTALL)):
        m = re.search(pattern, text, flags)
        if m:
            return m.group(1)
    m = re.search(rf'"{key}"\s*:\s*([^,\s]*)', text) or re.search(rf"{key}\s*:\s*([^,\s]*)", text)
    return m.group(1) if m else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(response: str, *, plain: bool = False) -> str | None:
    """The answer as a string (a JSON value other than a string as Python's ``str`` of it,
    as ZeroEval compares them), or None when the response holds none. ``plain``: the model was
    asked for the answer alone (prompt style ``short``), so the whole response is the answer."""
    if plain:
        return response.strip()
    obj = first_json_object(response)
    if obj is not None and "answer" in obj:
        return str(obj["answer"])
    value = json_field(response, "answer")
    return value if value is not None else last_boxed(response)
