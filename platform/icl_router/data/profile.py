"""Profile a pool: generate with vLLM on Ray Data, grade, append to ``outcomes/``.

For each candidate model, only the selected queries that have no outcome for
that model yet are run (a new model runs alone, new queries run alone). Each
model's rows stream out of one Ray Data pipeline (``ray.data.llm.build_processor``
with ``vLLMEngineProcessorConfig``: chat template -> vLLM engine -> grading) and
are appended ``shard_size`` rows at a time, each shard its own file with a fresh
run id. A job killed half way keeps the shards it wrote; the rerun reads them
and runs only the rest, so every pair ends up present exactly once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from icl_router import schemas
from icl_router.config import VLLM_CPU_ENV, CandidateModelConfig, ProfileConfig
from icl_router.data.dataset import Dataset, DatasetError
from icl_router.data.splits import make_split
from icl_router.graders import GRADERS, grade
from icl_router.kinds import PromptStyle
from icl_router.pretrained import prepare_model_path
from icl_router.raycluster import ensure_ray

# Prompt style ``json``, ZeroEval's protocol: the graders read the "answer" field of a JSON object
# (graders/extract.py). Style ``short``: the answer alone, and the whole response is graded.
_JSON = '\n\nThink step by step, then reply with a JSON object: {"reasoning": "your steps", "answer": "WHAT"}.'
_CODE = "{question}\n\nWrite the complete Python function in one ```python code block."
PROMPTS: dict[PromptStyle, dict[str, str]] = {
    "json": {
        "gsm8k": "{question}" + _JSON.replace("WHAT", "the final number only"),
        "math": "{question}" + _JSON.replace("WHAT", "the final answer, in LaTeX if needed"),
        "multiple_choice": "{question}" + _JSON.replace("WHAT", "the letter of the correct option"),
        "crux": "{question}" + _JSON.replace("WHAT", "the output, as a Python literal"),
        "exact_match": "{question}" + _JSON.replace("WHAT", "a short answer"),
        "f1": "{question}" + _JSON.replace("WHAT", "a short answer"),
        "code": _CODE,
    },
    "short": {
        "gsm8k": "{question}\n\nGive only the final number.",
        "math": "{question}\n\nGive only the final answer.",
        "multiple_choice": "{question}\n\nAnswer with the letter of the correct option only.",
        "crux": "{question}\n\nReply with the output only, as a Python literal.",
        "exact_match": "{question}\n\nAnswer with a few words only.",
        "f1": "{question}\n\nAnswer with a few words only.",
        "code": _CODE,
    },
}

def _log(msg: str) -> None:
    print(f"profile: {msg}", file=sys.stderr, flush=True)


def select_queries(ds: Dataset, cfg: ProfileConfig, *, query_ids: list[str] | None = None) -> pa.Table:
    """The queries to profile (dataset order; anchors in anchor order), checked to be gradable.
    ``query_ids`` (e.g. a router's anchors, which need not be the dataset's) replaces ``cfg.queries``."""
    queries = ds.read_queries()
    if query_ids is not None:
        ids = list(query_ids)
    elif cfg.queries == "all":
        ids = queries.column(schemas.QUERY_ID).to_pylist()
    elif cfg.queries == "anchors":
        ids = ds.read_anchors().column(schemas.QUERY_ID).to_pylist()
    else:
        ids = make_split(queries, cfg.split).part(cfg.part)
    index = {q: i for i, q in enumerate(queries.column(schemas.QUERY_ID).to_pylist())}
    unknown = [q for q in ids if q not in index]
    if unknown:
        raise DatasetError(f"{len(unknown)} selected queries are not in {ds.queries_path} (e.g. {unknown[:3]})")
    table = queries.take(pa.array([index[q] for q in ids], pa.int64()))
    if cfg.tasks is not None:
        table = table.filter(pc.is_in(table.column(schemas.TASK), pa.array(cfg.tasks, pa.string())))
    bad: dict[str, int] = {}
    for task, grader, gold in zip(*(table.column(c).to_pylist() for c in (schemas.TASK, schemas.GRADER, schemas.GOLD))):
        if grader not in GRADERS or gold is None:
            key = f"{task} (grader={grader!r}{', gold missing' if gold is None else ''})"
            bad[key] = bad.get(key, 0) + 1
    if bad:
        raise DatasetError(
            f"{sum(bad.values())} selected queries cannot be graded: {bad}; graders are {sorted(GRADERS)} and need a gold. "
            "Leave those tasks out with `tasks: [...]` in the config, or fix the grader/gold columns"
        )
    return table


def build_prompt(grader: str | None, question: str, *, style: PromptStyle = "json") -> str:
    """The prompt asking ``question`` for ``grader``; a question no grader reads (logged traffic without a
    reference, judged instead) is asked as it came."""
    if grader not in PROMPTS[style]:
        return question
    return PROMPTS[style][grader].replace("{question}", question)  # not format(): the templates hold JSON braces


def _request(row: dict[str, Any], *, sampling: dict[str, Any], style: PromptStyle, max_tokens: dict[str, int]) -> dict[str, Any]:
    """Ray Data preprocess: one chat request per query; id, grader and gold ride along to grading."""
    return {
        "messages": [{"role": "user", "content": build_prompt(row[schemas.GRADER], row[schemas.TEXT], style=style)}],
        "sampling_params": {**sampling, **({"max_tokens": max_tokens[row[schemas.TASK]]} if row[schemas.TASK] in max_tokens else {})},
        schemas.QUERY_ID: row[schemas.QUERY_ID],
        schemas.GRADER: row[schemas.GRADER],
        schemas.GOLD: row[schemas.GOLD],
    }


def graded_outcome(
    row: dict[str, Any], response: str, *, model_id: str, cost: float | None, latency_s: float | None,
    prompt_tokens: int | None, completion_tokens: int | None, style: PromptStyle = "json",
) -> dict[str, Any]:
    """One query's outcome row: ``response`` graded against the row's grader and gold, read as the
    prompt style asked for it (the profile job and the service's onboarding both write these; code
    answers run in the sandbox)."""
    score = float(grade(row[schemas.GRADER], response, row[schemas.GOLD], plain=style == "short"))
    return {
        schemas.QUERY_ID: row[schemas.QUERY_ID],
        schemas.MODEL_ID: model_id,
        schemas.SAMPLE: 0,
        schemas.SCORE: score,
        schemas.CORRECT: score >= schemas.CORRECT_THRESHOLD,
        schemas.RESPONSE: response,
        schemas.COST: cost,
        schemas.LATENCY_S: latency_s,
        schemas.PROMPT_TOKENS: prompt_tokens,
        schemas.COMPLETION_TOKENS: completion_tokens,
    }


def answer_row(row: dict[str, Any], response: str, *, model_id: str, cost: float | None, latency_s: float | None,
               prompt_tokens: int | None, completion_tokens: int | None) -> dict[str, Any]:
    """One query's answer, ungraded (a judge grades it later): an outcome row without score and correct."""
    return {schemas.QUERY_ID: row[schemas.QUERY_ID], schemas.MODEL_ID: model_id, schemas.RESPONSE: response, schemas.COST: cost,
            schemas.LATENCY_S: latency_s, schemas.PROMPT_TOKENS: prompt_tokens, schemas.COMPLETION_TOKENS: completion_tokens}


def _outcome(row: dict[str, Any], *, model_id: str, cost_in: float, cost_out: float, style: PromptStyle, graded: bool = True) -> dict[str, Any]:
    """Ray Data postprocess: grade one response into an outcome row (``graded=False``: keep it ungraded)."""
    n_in, n_out = int(row["num_input_tokens"]), int(row["num_generated_tokens"])
    # latency per row: the engine's time from submitting this request to its last token (other
    # requests of the batch run alongside, so the sum over rows exceeds the wall time)
    make = partial(graded_outcome, style=style) if graded else answer_row
    return make(row, row["generated_text"], model_id=model_id, cost=n_in * cost_in + n_out * cost_out,
                latency_s=float(row["time_taken_llm"]), prompt_tokens=n_in, completion_tokens=n_out)


def engine_config(m: CandidateModelConfig, *, batch_size: int) -> Any:
    """The ``vLLMEngineProcessorConfig`` of one candidate model (CPU or GPU placement)."""
    from ray.data.llm import ChatTemplateStageConfig, vLLMEngineProcessorConfig

    cpu = m.accelerator == "cpu"
    return vLLMEngineProcessorConfig(
        model_source=m.path,
        engine_kwargs=dict(m.engine_kwargs),
        batch_size=batch_size,
        concurrency=m.concurrency,
        accelerator_type=m.accelerator_type,
        # CPU: the default placement asks for a GPU and waits forever. GPU: one GPU bundle per
        # tensor-parallel worker, Ray's default.
        placement_group_config={"bundles": [{"CPU": 1}]} if cpu else None,
        runtime_env={"env_vars": {**VLLM_CPU_ENV, **m.env_vars} if cpu else dict(m.env_vars)},
        chat_template_stage=ChatTemplateStageConfig(chat_template=m.chat_template),
        # The engine tokenizes prompts and detokenizes outputs itself: two actor stages fewer.
        tokenize_stage=False,
        detokenize_stage=False,
    )


def generate_outcomes(
    todo: pa.Table, m: CandidateModelConfig, *, batch_size: int, shard_size: int, style: PromptStyle, max_tokens: dict[str, int],
    graded: bool = True,
) -> Iterator[pa.Table]:
    """Outcome tables of ``shard_size`` rows (the last may be smaller), in completion order; ``graded=False``:
    answer rows (``answer_row``) of queries no grader reads."""
    import ray
    from ray.data.llm import build_processor

    processor = build_processor(
        engine_config(m, batch_size=batch_size),
        preprocess=partial(_request, sampling=m.sampling.model_dump(), style=style, max_tokens=max_tokens),
        postprocess=partial(_outcome, model_id=m.name, cost_in=m.cost_per_input_token, cost_out=m.cost_per_output_token, style=style,
                            graded=graded),
    )
    blocks = [todo.slice(i, shard_size) for i in range(0, len(todo), shard_size)]
    yield from processor(ray.data.from_arrow(blocks)).iter_batches(batch_size=shard_size, batch_format="pyarrow")


def run_profile(cfg: ProfileConfig, *, query_ids: list[str] | None = None) -> dict:
    """Profile ``cfg.models`` on the selected queries (``query_ids``: these instead of ``cfg.queries``)."""
    ds = Dataset(cfg.dataset)
    selected = select_queries(ds, cfg, query_ids=query_ids).select([schemas.QUERY_ID, schemas.TEXT, schemas.TASK, schemas.GRADER, schemas.GOLD])
    summary: dict[str, Any] = {"dataset": str(ds.root), "queries": len(selected), "ran": 0, "models": {}}
    # every path checked (and a .gguf converted) before any engine starts
    models = [m.model_copy(update={"path": prepare_model_path(m.path, accelerator=m.accelerator, what=f"models[{i}].path")})
              for i, m in enumerate(cfg.models)]
    for i, m in enumerate(models, 1):
        done = pa.array(list(set(ds.read_outcomes([m.name]).column(schemas.QUERY_ID).to_pylist())), pa.string())
        todo = selected.filter(pc.invert(pc.is_in(selected.column(schemas.QUERY_ID), done)))
        info = {"skipped": len(selected) - len(todo), "ran": 0, "files": 0, "accuracy": None, "seconds": 0.0}
        summary["models"][m.name] = info
        _log(f"model {i}/{len(cfg.models)} {m.name!r}: {len(todo)} pairs to run, {info['skipped']} already have outcomes")
        if len(todo) == 0:
            continue
        ensure_ray(cfg.ray)
        t0, correct = time.perf_counter(), 0
        for shard in generate_outcomes(todo, m, batch_size=cfg.batch_size, shard_size=cfg.shard_size, style=cfg.prompt_style,
                                        max_tokens=cfg.max_tokens):
            (path,) = ds.append_outcomes(shard)  # a fresh run id per shard: never overwrites
            info["ran"] += len(shard)
            info["files"] += 1
            correct += pc.sum(shard.column(schemas.CORRECT).cast(pa.int64())).as_py() or 0
            _log(f"{m.name}: {info['ran']}/{len(todo)} done, wrote {path.name}")
        info["seconds"] = round(time.perf_counter() - t0, 2)
        info["accuracy"] = round(correct / info["ran"], 4)
        summary["ran"] += info["ran"]
        _log(f"{m.name}: {info['ran']} outcomes in {info['seconds']} s, accuracy {info['accuracy']}")
    return summary
