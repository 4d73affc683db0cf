"""Judge models against the project's graders: each candidate judge reads real graded answers (reference unseen).

Both sides in one run: the graders' labels (a dataset's outcomes with their ``response``, written by
``icl-router profile``) and each judge's verdicts on the same answers, through the path ``icl-router
reprofile`` uses (``data/judge.py``: the rubric, Ray Data + vLLM, the verdict parser). Per judge:
accuracy, Cohen's kappa and the confusion counts against the graders, unreadable verdicts, the same by
task, and whether reprofile's default gate (kappa >= 0.6 on >= 30 answers) would open. Two trivial
baselines (``always_correct``, ``always_wrong``) show what agreement means on the sample: with few
right answers ``always_wrong`` is highly accurate and has kappa 0, which is why the gate reads kappa.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULT_JUDGES = ["smollm2-135m-instruct=runs/models/smollm2-135m-instruct", "gemma-3-270m=runs/models/gemma-3-270m"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="runs/judge-src", help="a dataset whose outcomes carry responses (icl-router profile wrote them; docs/results.md)")
    p.add_argument("--judge", action="append", default=None, metavar="NAME=PATH",
                   help=f"a candidate judge served by path through vLLM (repeatable; default: {' '.join(DEFAULT_JUDGES)})")
    p.add_argument("--models", nargs="*", default=None, help="whose answers are judged (default: every model of the dataset)")
    p.add_argument("--limit", type=int, default=0, help="a seeded sample of this many answers (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rubric-file", default=None, help="the rubric ({question}, {answer}); default: data/judge.py's DEFAULT_RUBRIC")
    p.add_argument("--max-tokens", type=int, default=8, help="of a verdict")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--min-agreement", type=float, default=0.6, help="the gate's kappa, as reprofile's judge.min_agreement")
    p.add_argument("--min-calibration", type=int, default=30)


def graded_answers(dataset: str, *, models: list[str] | None, limit: int, seed: int) -> list[dict[str, Any]]:
    """The graded answers of ``dataset`` with their question: query_id, model_id, task, question, response, correct."""
    import numpy as np

    from icl_router import schemas
    from icl_router.data.dataset import Dataset

    ds = Dataset(dataset)
    queries = {r[schemas.QUERY_ID]: r for r in ds.read_queries().to_pylist()}
    out = ds.read_outcomes(models).to_pylist()
    rows = sorted(({"query_id": r[schemas.QUERY_ID], "model_id": r[schemas.MODEL_ID], "task": queries[r[schemas.QUERY_ID]][schemas.TASK],
                    "question": queries[r[schemas.QUERY_ID]][schemas.TEXT], "response": r[schemas.RESPONSE], "correct": bool(r[schemas.CORRECT])}
                   for r in out if r[schemas.RESPONSE] is not None), key=lambda r: (r["query_id"], r["model_id"]))
    if not rows:
        raise SystemExit(f"{dataset}: no outcomes with a response; profile some models on it first (icl-router profile)")
    if limit and limit < len(rows):
        rows = [rows[i] for i in sorted(np.random.default_rng(seed).choice(len(rows), limit, replace=False))]
    return rows


def score_judge(rows: list[dict[str, Any]], scores: list[float | None], args: argparse.Namespace) -> dict[str, Any]:
    """Agreement of one judge's scores with the graders on ``rows``: overall, by task and by answering model, and the gate."""
    from icl_router.data.judge import gate, score_agreement

    def agree(idx: list[int]) -> dict[str, Any]:
        return score_agreement([scores[i] for i in idx], [rows[i]["correct"] for i in idx])

    res = agree(list(range(len(rows))))
    for key in ("task", "model_id"):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[r[key]].append(i)
        res[f"by_{key.removesuffix('_id')}"] = {g: {k: v for k, v in agree(idx).items() if k in ("n", "accuracy", "kappa", "unparsed")}
                                                for g, idx in sorted(groups.items())}
    passed, why = gate(res, metric="kappa", min_agreement=args.min_agreement, min_calibration=args.min_calibration)
    res["gate"] = {"passed": passed, "why": why}
    return res


def run(args: argparse.Namespace) -> dict:
    from icl_router.config import CandidateModelConfig, RayConfig
    from icl_router.data.judge import DEFAULT_RUBRIC, judge_vllm, parse_verdict, render

    rows = graded_answers(args.dataset, models=args.models, limit=args.limit, seed=args.seed)
    rubric = Path(args.rubric_file).read_text() if args.rubric_file else DEFAULT_RUBRIC
    prompts = [render(rubric, r["question"], r["response"]) for r in rows]
    out: dict[str, Any] = {"dataset": args.dataset, "answers": len(rows), "graders_correct": sum(r["correct"] for r in rows),
                           "rubric": "default" if not args.rubric_file else args.rubric_file, "judges": {}, "examples": {}}
    out["judges"]["always_correct"] = score_judge(rows, [1.0] * len(rows), args)
    out["judges"]["always_wrong"] = score_judge(rows, [0.0] * len(rows), args)
    for spec in args.judge or DEFAULT_JUDGES:
        name, _, path = spec.partition("=")
        model = CandidateModelConfig(name=name, path=path or name, engine_kwargs={"dtype": "bfloat16", "enforce_eager": True,
                                                                                "max_model_len": args.max_model_len})
        t0 = time.perf_counter()
        replies = judge_vllm(prompts, model, max_tokens=args.max_tokens, batch_size=args.batch_size, ray_cfg=RayConfig(num_cpus=8))
        seconds = time.perf_counter() - t0
        res = score_judge(rows, [parse_verdict(t) for t in replies], args)
        res["seconds"] = round(seconds, 1)
        res["answers_per_s"] = round(len(rows) / seconds, 2)
        out["judges"][name] = res
        out["examples"][name] = [(t or "")[:80] for t in replies[:5]]
    return out
