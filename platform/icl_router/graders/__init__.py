"""Graders: ``grade(grader, response, gold, **kw) -> float`` in [0, 1], one per task family.

The name is the dataset's ``grader`` column. Answers are pulled out of responses the way the
source benchmark does (ZeroEval's JSON "answer" field, see ``extract``). Pure Python: no
ray, deepspeed, vllm or torch (sympy is used when installed).
"""

from __future__ import annotations

from collections.abc import Callable

from icl_router.graders.choice import grade_multiple_choice
from icl_router.graders.code import grade_code
from icl_router.graders.crux import grade_crux
from icl_router.graders.math_answer import grade_math
from icl_router.graders.numeric import grade_gsm8k
from icl_router.graders.qa import grade_exact_match, grade_f1

GRADERS: dict[str, Callable[..., float]] = {
    "gsm8k": grade_gsm8k,
    "math": grade_math,
    "multiple_choice": grade_multiple_choice,
    "crux": grade_crux,
    "exact_match": grade_exact_match,
    "f1": grade_f1,
    "code": grade_code,
}


def grade(grader: str, response: str, gold: str | dict, **kw) -> float:
    """``plain=True``: the whole response is the answer (prompt style ``short``), else the answer is
    pulled out as ZeroEval does (``extract``)."""
    try:
        fn = GRADERS[grader]
    except KeyError:
        raise ValueError(f"unknown grader {grader!r}: the grader column must be one of {sorted(GRADERS)}") from None
    return fn(response, gold, **kw)
