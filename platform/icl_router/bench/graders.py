"""Graders against published figures: ZeroEval accuracy re-graded from raw generations, and
HumanEval's canonical solutions (must pass) and mutants of them (must fail) in the sandbox."""

from __future__ import annotations

import argparse
import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from icl_router.graders import grade
from icl_router.graders.code import build_program
from icl_router.graders.numeric import grade_gsm8k
from icl_router.sandbox import isolation, run_code

# ZeroEval task folder -> our grader
TASK_GRADERS = {"gsm": "gsm8k", "math-l5": "math", "crux": "crux"}
DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"

# Appended to a solution: the entry point's every return value is changed (its type kept), so
# any test that checks a return value fails; one that survives checks nothing of the result.
MUTANT_SUFFIX = '''

def _mutate(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "#"
    if isinstance(r, (list, tuple)):
        return type(r)(list(r) + [None])
    if isinstance(r, dict):
        return dict(r, _mutant=None)
    return 0 if r is None else None

_original = ENTRY

def ENTRY(*args, **kwargs):
    return _mutate(_original(*args, **kwargs))
'''


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (../shared/data)")
    p.add_argument("--workers", type=int, default=4, help="sandboxes run at once")
    p.add_argument("--humaneval-limit", type=int, default=0, help="first N HumanEval problems (0: all)")
    p.add_argument("--timeout-s", type=float, default=5.0)


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def zeroeval_rows(data: Path) -> list[dict]:
    root = data / "generations" / "zeroeval"
    rows = []
    for task, grader in TASK_GRADERS.items():
        published = {r["Model"]: float(r["Acc"]) for r in json.loads((root / f"{task}.summary.json").read_text())}
        for path in sorted((root / task).glob("*.jsonl.gz")):
            model = path.name.removesuffix(".jsonl.gz")
            recs = read_jsonl_gz(path)
            # ZeroEval divides by all items: an unparsable response counts as wrong
            acc = 100 * sum(grade(grader, r["output"][0], r["answer"]) for r in recs) / len(recs)
            row = {"task": task, "model": model, "grader": grader, "n": len(recs), "published": published[model]}
            row |= {"reproduced": round(acc, 2), "diff": round(acc - published[model], 2)}
            if grader == "math":  # ZeroEval's own MATH rule is first-number equality: show it too
                first = 100 * sum(grade_gsm8k(r["output"][0], r["answer"]) for r in recs) / len(recs)
                row["first_number_rule"] = round(first, 2)
            rows.append(row)
    return rows


def humaneval(data: Path, *, limit: int, workers: int, timeout_s: float) -> dict:
    problems = read_jsonl_gz(data / "benchmarks" / "humaneval.jsonl.gz")
    problems = problems[:limit] if limit else problems
    canonical = [build_program(p["prompt"] + p["canonical_solution"], p) for p in problems]
    mutants = [
        build_program(p["prompt"] + p["canonical_solution"] + MUTANT_SUFFIX.replace("ENTRY", p["entry_point"]), p)
        for p in problems
    ]
    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda prog: run_code(prog, timeout_s=timeout_s), canonical + mutants))
    elapsed = time.monotonic() - start
    canon, mut = results[: len(problems)], results[len(problems) :]
    return {
        "humaneval_total": len(problems),
        "humaneval_canonical_pass": sum(r.ok for r in canon),
        "humaneval_mutant_fail": sum(not r.ok for r in mut),
        "humaneval_canonical_failed": [p["task_id"] for p, r in zip(problems, canon) if not r.ok],
        "humaneval_mutant_survived": [p["task_id"] for p, r in zip(problems, mut) if r.ok],
        "sandbox_programs_per_s": round(len(results) / elapsed, 1),
    }


def run(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    if not (data / "generations" / "zeroeval").is_dir():
        raise SystemExit(f"no ZeroEval generations under {data}: pass --data pointing at shared/data")
    rows = zeroeval_rows(data)
    out = {"rows": rows, "max_abs_diff": max(abs(r["diff"]) for r in rows)}
    out |= humaneval(data, limit=args.humaneval_limit, workers=args.workers, timeout_s=args.timeout_s)
    out["sandbox_isolation"] = isolation()
    return out
