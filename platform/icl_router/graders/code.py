"""Code (HumanEval / MBPP): run the program and its tests in the sandbox; 1.0 if all pass.

gold: HumanEval ``{"prompt", "test", "entry_point"}`` (the test defines ``check``), MBPP
``{"test_list": [...], "test_setup_code"?: ...}`` (also as the string of a Python list of asserts,
LLMRouter's form), or a string of test code to append. A string that defines ``check`` without
calling it tests nothing: it is refused (give HumanEval's dict, which names the entry point).
"""

from __future__ import annotations

import ast
import json
import re

from icl_router.sandbox import run_code

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str, *, entry_point: str | None = None) -> str:
    """The fenced block that defines ``entry_point`` (else the first fenced block, else all)."""
    blocks = _FENCE.findall(response)
    if entry_point:
        for block in blocks:
            if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
                return block
    return blocks[0] if blocks else response


def _string_gold(gold: str) -> str | dict:
    """A string gold as the test it is: a JSON object is the dict form (datasets store golds as
    strings), a list literal of asserts is MBPP's ``test_list``."""
    if gold.lstrip().startswith("{"):
        try:
            obj = json.loads(gold)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return obj
    if gold.lstrip().startswith("["):
        try:
            tests = ast.literal_eval(gold)
        except (ValueError, SyntaxError):
            tests = None
        if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
            return {"test_list": tests}
    if re.search(r"^def\s+check\s*\(", gold, re.MULTILINE) and not re.search(r"^check\s*\(", gold, re.MULTILINE):
        raise ValueError("code gold defines check(candidate) but never calls it, so it would pass any answer; "
                         "give HumanEval's {prompt, test, entry_point}")
    return gold


def build_program(response: str, gold: str | dict) -> str:
    if isinstance(gold, str):
        gold = _string_gold(gold)
    if isinstance(gold, str):
        return extract_code(response) + "\n\n" + gold + "\n"
    if "test_list" in gold:  # MBPP
        tests = "\n".join(gold["test_list"])
        return extract_code(response) + "\n\n" + gold.get("test_setup_code", "") + "\n" + tests + "\n"
    try:
        entry = gold["entry_point"]
        code = extract_code(response, entry_point=entry)
        if not re.search(rf"def\s+{re.escape(entry)}\s*\(", code):  # a bare completion of the prompt
            code = gold["prompt"] + code
        return code + "\n\n" + gold["test"] + f"\n\ncheck({entry})\n"
    except KeyError as e:
        raise ValueError(
            f"code gold lacks {e}: give HumanEval's prompt/test/entry_point, MBPP's test_list, or test code"
        ) from None


def grade_code(response: str, gold: str | dict, *, timeout_s: float = 5.0, memory_mb: int = 512, plain: bool = False) -> float:
    del plain  # the program is the fenced block whatever the prompt style
    return float(run_code(build_program(response, gold), timeout_s=timeout_s, memory_mb=memory_mb).ok)
