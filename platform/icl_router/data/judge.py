"""A judge model grades answers that no grader can: logged queries with neither a reference nor a gold.

The judge reads a rubric (``JudgeConfig.rubric``; ``DEFAULT_RUBRIC`` by default) with the question and
one model's answer filled in, and replies; ``parse_verdict`` turns the reply into a score in [0, 1]
(Yes / correct -> 1, No / incorrect -> 0, or a bare number in [0, 1]); a reply it cannot read is not a
grade and is counted, never guessed.

A judge is trusted only as far as it agrees with the project's graders: ``icl-router reprofile`` has it
judge a calibration sample of answers the graders graded (without the reference), ``agreement``
measures accuracy, Cohen's kappa and the confusion counts, and ``gate`` lets the judged outcomes into
the evidence store only when the configured metric reaches ``min_agreement`` on at least
``min_calibration`` readable verdicts. ``icl-router bench judge`` measures candidate judges the same
way (docs/results.md).

Running a judge: ``judge_http`` asks an OpenAI-compatible endpoint (a provider, a vLLM server, the
running service by a pool model's name); ``judge_vllm`` runs a pool model by path through Ray Data +
vLLM, as the profile job runs candidates. Ray and vLLM are imported inside the functions.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from icl_router import schemas

DEFAULT_RUBRIC = (
    "You are grading another assistant's answer to a question. Decide whether the answer is correct: "
    "it must answer the question that was asked, and what it states must be true. Ignore style and length.\n\n"
    "Question: {question}\n\n"
    "Answer: {answer}\n\n"
    "Is the answer correct? Reply with one word: Yes or No."
)
PLACEHOLDERS = ("{question}", "{answer}")
MAX_ANSWER_CHARS = 4000  # a judge's context is bounded: a longer answer is cut (and says so)

# earliest match wins; the negated forms come first so "not correct" is never read as "correct"
_WORDS = re.compile(
    r"\b(not\s+(?:correct|right|true)|incorrect|wrong|false|no|yes|correct|right|true)\b", re.IGNORECASE
)
_NUMBER = re.compile(r"^(?:score|verdict|grade)?\s*[:=]?\s*(0(?:\.\d+)?|1(?:\.0+)?|\.\d+)\s*(?:/\s*1)?$", re.IGNORECASE)
_POSITIVE = {"yes", "correct", "right", "true"}


def render(rubric: str, question: str, answer: str) -> str:
    """The judge's prompt: ``rubric`` with the question and the answer put in (not ``format``: a rubric may hold braces)."""
    if len(answer) > MAX_ANSWER_CHARS:
        answer = answer[:MAX_ANSWER_CHARS] + " [... cut]"
    return rubric.replace("{question}", question).replace("{answer}", answer)


def parse_verdict(text: str | None) -> float | None:
    """A judge's reply as a score in [0, 1], or None when it says neither (module docstring)."""
    if not text:
        return None
    body = text.strip().strip("*_`\"'.!# \n").strip()
    m = _NUMBER.match(body)
    if m:
        return float(m.group(1))
    m = _WORDS.search(text[:400])
    if m is None:
        return None
    return 1.0 if m.group(1).lower() in _POSITIVE else 0.0


def agreement(judge: Sequence[bool], graders: Sequence[bool]) -> dict[str, Any]:
    """How far the judge's labels agree with the graders' on the same answers: n, accuracy, Cohen's kappa
    (None when chance agreement is 1: both label every answer alike, so agreement says nothing) and the
    confusion counts (tp: both correct; fp: the judge says correct, the graders wrong; ...)."""
    if len(judge) != len(graders):
        raise ValueError(f"agreement: {len(judge)} judge labels for {len(graders)} grader labels")
    n = len(judge)
    tp = sum(1 for j, g in zip(judge, graders) if j and g)
    fp = sum(1 for j, g in zip(judge, graders) if j and not g)
    fn = sum(1 for j, g in zip(judge, graders) if not j and g)
    tn = n - tp - fp - fn
    out: dict[str, Any] = {"n": n, "accuracy": None, "kappa": None, "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}
    if n == 0:
        return out
    po = (tp + tn) / n
    pe = ((tp + fp) / n) * ((tp + fn) / n) + ((fn + tn) / n) * ((fp + tn) / n)
    out["accuracy"] = round(po, 4)
    out["kappa"] = None if pe >= 1.0 - 1e-12 else round((po - pe) / (1.0 - pe), 4)
    out["judge_positive_rate"] = round((tp + fp) / n, 4)
    out["grader_positive_rate"] = round((tp + fn) / n, 4)
    return out


def score_agreement(scores: Sequence[float | None], correct: Sequence[bool]) -> dict[str, Any]:
    """``agreement`` of a judge's scores (None: unreadable, left out and counted as ``unparsed``) with the
    graders' labels on the same answers, a score reading correct at ``schemas.CORRECT_THRESHOLD``."""
    ok = [(s, c) for s, c in zip(scores, correct, strict=True) if s is not None]
    out = agreement([s >= schemas.CORRECT_THRESHOLD for s, _ in ok], [c for _, c in ok])
    out["unparsed"] = len(scores) - len(ok)
    return out


def gate(agree: dict[str, Any], *, metric: str, min_agreement: float, min_calibration: int) -> tuple[bool, str]:
    """(passed, why): the judge's outcomes may join the evidence only when ``agree[metric]`` reaches
    ``min_agreement`` on at least ``min_calibration`` calibration answers."""
    n, value = agree.get("n", 0), agree.get(metric)
    if n < min_calibration:
        return False, (f"only {n} calibration answers with a readable verdict (min_calibration {min_calibration}): "
                       "too few to trust the judge; re-profile more gradable traffic or lower judge.min_calibration")
    if value is None:
        return False, (f"{metric} is undefined on {n} calibration answers (the judge or the graders gave every answer the "
                       "same label): agreement cannot be told from chance")
    if value < min_agreement:
        return False, f"{metric} {value} < judge.min_agreement {min_agreement} on {n} calibration answers: the judge is not trusted"
    return True, f"{metric} {value} >= judge.min_agreement {min_agreement} on {n} calibration answers"


def chat(url: str, key: str | None, model: str, prompt: str, *, max_tokens: int, temperature: float, timeout: float = 300.0) -> tuple[str, dict]:
    """One chat completion from an OpenAI-compatible ``url`` (…/v1): (the reply's text, its usage)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": temperature}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers={"content-type": "application/json",
                                 **({"authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    return out["choices"][0]["message"]["content"] or "", out.get("usage") or {}


def judge_http(prompts: list[str], *, url: str, key: str | None, model: str, max_tokens: int, concurrency: int = 4,
               timeout: float = 300.0) -> list[str | None]:
    """The judge's reply to each prompt, asked of ``model`` at ``url``; None for a request that failed."""

    def one(prompt: str) -> str | None:
        try:
            return chat(url, key, model, prompt, max_tokens=max_tokens, temperature=0.0, timeout=timeout)[0]
        except (OSError, ValueError, KeyError, IndexError):
            return None

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def _judge_request(row: dict[str, Any], *, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": row["prompt"]}], "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens},
            "idx": row["idx"]}


def _judge_reply(row: dict[str, Any]) -> dict[str, Any]:
    return {"idx": int(row["idx"]), "reply": row["generated_text"]}


def judge_vllm(prompts: list[str], model: Any, *, max_tokens: int, batch_size: int = 32, ray_cfg: Any = None) -> list[str | None]:
    """The judge's reply to each prompt from ``model`` (a ``CandidateModelConfig``: a path vLLM serves) on Ray Data."""
    if not prompts:
        return []
    import pyarrow as pa
    import ray
    from ray.data.llm import build_processor

    from icl_router.data.profile import engine_config
    from icl_router.pretrained import prepare_model_path
    from icl_router.raycluster import ensure_ray

    model = model.model_copy(update={"path": prepare_model_path(model.path, accelerator=model.accelerator, what=f"judge {model.name} path")})
    if ray_cfg is not None:
        ensure_ray(ray_cfg)
    processor = build_processor(engine_config(model, batch_size=batch_size), preprocess=partial(_judge_request, max_tokens=max_tokens),
                                postprocess=_judge_reply)
    rows = pa.table({"idx": list(range(len(prompts))), "prompt": prompts})
    out: list[str | None] = [None] * len(prompts)
    for r in processor(ray.data.from_arrow(rows)).iter_rows():
        out[int(r["idx"])] = r["reply"]
    return out


def verdict_rows(items: list[dict[str, Any]], replies: list[str | None], *, judge: str) -> list[dict[str, Any]]:
    """One judgement row per judged answer (``items``: query_id, model_id, kind): by which judge, the reply and its
    score (None: unreadable, or the request failed: reply None)."""
    return [{schemas.QUERY_ID: it[schemas.QUERY_ID], schemas.MODEL_ID: it[schemas.MODEL_ID], "judge": judge, "kind": it.get("kind", ""),
             "reply": reply, schemas.SCORE: parse_verdict(reply)} for it, reply in zip(items, replies)]
