"""MATH answers: LaTeX normalisation, then string, numeric or symbolic (sympy) equivalence.

The answer is the JSON "answer" field (ZeroEval) or the last \\boxed{...}. ZeroEval's own rule
for MATH is "first number equals first number" (its golds are integers); this grader is
stricter ("5 and 7" is not 5) and also reads LaTeX (\\frac{10}{2} is 5, 2^{10} is 1024).
"""

from __future__ import annotations

import re

from icl_router.graders.extract import extract_answer, last_boxed

_UNIT_WORDS = (
    r"(square|sq\.?|cubic)?\s*(units?|degrees?|cm|mm|km|m|meters?|inches|inch|in|feet|foot|ft|"
    r"miles?|mph|hours?|minutes?|seconds?|days?|weeks?|years?|dollars?|cents?|pounds?|lbs?|"
    r"kg|g|grams?|liters?|ml|percent|ways|people|students|cookies|marbles)(\^?\{?[23]\}?)?"
)


def _braced(s: str, i: int) -> tuple[str, int]:
    """The {...} group starting at s[i] (or the single character there) and the index after it."""
    if i < len(s) and s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1 : j], j + 1
        raise ValueError("unbalanced braces")
    if i >= len(s):
        raise ValueError("missing argument")
    return s[i], i + 1


def _rewrite_fracs(s: str) -> str:
    """\\frac{a}{b} and \\frac12 -> {a}/{b}, grouped, recursively."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            return "".join(out) + s[i:]
        out.append(s[i:j])
        k = j + len("\\frac")
        num, k = _braced(s, k)
        den, k = _braced(s, k)
        out.append("(" + _rewrite_fracs(num) + ")/(" + _rewrite_fracs(den) + ")")
        i = k


def normalize(answer: str) -> str:
    s = answer.strip()
    inner = last_boxed(s)
    if inner is not None:
        s = inner
    s = s.strip("*_ ")  # markdown emphasis: **5**, ___3___
    while s.count("}") > s.count("{") and s.endswith(("}", "$")):  # a broken \boxed{12}}$$
        s = s[:-1].rstrip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"\\(d|t)frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")  # degrees
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(text|textbf|mathrm|mbox|mathbf)\{\s*([^{}]*)\}", r"\2", s)
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"^[a-zA-Z]\s*(\([a-z]\))?\s*=\s*(?=\S)", "", s)  # "x = 5", "f(x) = ..." -> right side
    s = re.sub(rf"^(-?[\d.,/\s]+?)\s*{_UNIT_WORDS}$", r"\1", s)  # "5 cm", "18 dollars"
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac\s*(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = s.replace(" ", "")
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # base subscripts: 221_{3} -> 221_3
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*", s):  # 5.0 -> 5, 0.50 -> 0.5
        s = s.rstrip("0").rstrip(".")
    if re.fullmatch(r"-?\d+/\d+", s):  # a/b -> \frac{a}{b}
        a, b = s.split("/")
        s = f"\\frac{{{a}}}{{{b}}}"
    if s.startswith("."):
        s = "0" + s
    return s


def _to_sympy(s: str):
    """A sympy expression for a normalised answer, or None if it is not a plain expression."""
    if len(s) > 80 or re.search(r"\^\{?\d{3,}", s):  # keep sympy away from huge powers
        return None
    try:
        t = _rewrite_fracs(s)
    except ValueError:
        return None
    t = re.sub(r"\\sqrt\[(\w+)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", t)
    t = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", t)
    t = t.replace("\\pi", "pi").replace("\\infty", "oo").replace("\\cdot", "*").replace("\\times", "*")
    t = t.replace("{", "(").replace("}", ")").replace("^", "**")
    if "\\" in t or not re.fullmatch(r"[\w\s.+\-*/()]+", t):
        return None
    try:
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:  # sympy is optional: string equality only
        return None
    try:
        return parse_expr(t, transformations=standard_transformations + (implicit_multiplication_application,))
    except Exception:  # sympy raises many kinds on odd input
        return None


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _equiv_expr(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = _to_sympy(a), _to_sympy(b)
    if x is None or y is None:
        return False
    try:
        if x.is_number and y.is_number:
            xv, yv = complex(x.evalf()), complex(y.evalf())
            return abs(xv - yv) <= 1e-6 * max(1.0, abs(yv))
        import sympy

        return sympy.simplify(x - y) == 0
    except Exception:
        return False


def equivalent(answer: str, gold: str) -> bool:
    a, b = normalize(answer), normalize(gold)
    if a == b:
        return True
    # tuples, intervals, lists: same brackets, element by element
    if a[:1] + a[-1:] == b[:1] + b[-1:] and a[:1] in "([{" and a[:1]:
        pa, pb = _split_top(a[1:-1]), _split_top(b[1:-1])
        if len(pa) == len(pb) > 1:
            return all(_equiv_expr(x, y) for x, y in zip(pa, pb))
    pa, pb = _split_top(a), _split_top(b)
    if len(pa) == len(pb) > 1:  # unbracketed lists "1,2": in order
        return all(_equiv_expr(x, y) for x, y in zip(pa, pb))
    return _equiv_expr(a, b)


def grade_math(response: str, gold: str, *, plain: bool = False) -> float:
    answer = extract_answer(response, plain=plain)
    return float(answer is not None and equivalent(answer, gold))
