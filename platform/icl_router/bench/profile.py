"""Generation throughput: one model, same prompts, Ray Data + vLLM (the profile job's path) vs a transformers loop.

The model is a real pretrained LM by default (SmolLM2-135M-Instruct, converted by ``make models``),
or ``--model tiny``: a random-weight tiny Qwen2, for the plumbing alone.

Both sides use the same number of CPU threads (``--threads``) and decode greedily exactly
``max_tokens`` tokens per prompt (vLLM ``ignore_eos``, transformers ``min_new_tokens``).
Headline figures include startup on both sides: for vLLM the Ray Data pipeline (actors,
engine load; ``ray.init`` excluded), for transformers the model load.
``vllm_steady_tokens_per_s`` counts only rows after the first block arrived (null when they all
arrive together: the engine batched every prompt at once);
``hf_generate_only_tokens_per_s`` only the generate calls.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ZEROEVAL = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "routing" / "zeroeval" / "matrix.jsonl"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=256, help="number of prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="vLLM rows per engine call; transformers prompts per generate")
    p.add_argument("--questions", default=str(ZEROEVAL), help="ZeroEval matrix.jsonl (GSM8K questions); generated ones if absent")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each side (vLLM's OMP_NUM_THREADS, torch.set_num_threads)")
    p.add_argument("--address", default=None, help="Ray cluster address; default: a local cluster")
    p.add_argument("--model", default="runs/models/smollm2-135m-instruct", help="a model directory, or 'tiny' (a random-weight tiny Qwen2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="of both sides")


def load_questions(path: Path, n: int) -> tuple[list[str], str]:
    if path.is_file():
        with path.open() as f:
            qs = [r["question"] for r in map(json.loads, f) if r["task"] == "gsm"][:n]
        return (qs * (n // len(qs) + 1))[:n], str(path)
    return [f"Tom has {i} apples and buys {i % 7 + 2} more. How many apples does he have?" for i in range(n)], "generated"


def _request(row: dict[str, Any], *, sampling: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": row["prompt"]}], "sampling_params": sampling, "i": row["i"]}


def _result(row: dict[str, Any]) -> dict[str, Any]:
    return {"i": row["i"], "text": row["generated_text"], "n_out": row["num_generated_tokens"]}


def run_vllm(model: Path, prompts: list[str], args: argparse.Namespace) -> tuple[dict[int, str], int, float, float]:
    """(texts by prompt index, tokens, seconds in all, seconds after the first block)."""
    import pyarrow as pa
    import ray
    from ray.data.llm import build_processor

    from icl_router.config import CandidateModelConfig, SamplingConfig
    from icl_router.data.profile import engine_config

    m = CandidateModelConfig(
        name="bench",
        path=str(model),
        sampling=SamplingConfig(max_tokens=args.max_tokens),
        engine_kwargs={"dtype": args.dtype, "enforce_eager": True, "max_model_len": 2048},
        env_vars={"OMP_NUM_THREADS": str(args.threads)},
    )
    sampling = {**m.sampling.model_dump(), "ignore_eos": True}
    table = pa.table({"i": list(range(len(prompts))), "prompt": prompts})
    blocks = [table.slice(i, args.batch_size) for i in range(0, len(table), args.batch_size)]
    t0 = time.perf_counter()
    processor = build_processor(engine_config(m, batch_size=args.batch_size), preprocess=partial(_request, sampling=sampling), postprocess=_result)
    texts, tokens, first = {}, 0, None
    for batch in processor(ray.data.from_arrow(blocks)).iter_batches(batch_size=None, batch_format="pyarrow"):
        if first is None:
            first, first_tokens = time.perf_counter(), sum(batch.column("n_out").to_pylist())
        texts.update(zip(batch.column("i").to_pylist(), batch.column("text").to_pylist()))
        tokens += sum(batch.column("n_out").to_pylist())
    end = time.perf_counter()
    return texts, tokens, end - t0, (end - first, tokens - first_tokens)


def run_hf(model: Path, prompts: list[str], args: argparse.Namespace) -> tuple[dict[int, str], int, float, float]:
    """(texts by prompt index, tokens, seconds in all, seconds in generate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(model), padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, args.dtype)).eval()
    texts, tokens, gen_s = {}, 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[start : start + args.batch_size]]
        enc = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = lm.generate(**enc, do_sample=False, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, pad_token_id=tok.pad_token_id)
        gen_s += time.perf_counter() - t1
        new = out[:, enc["input_ids"].shape[1] :]  # [B, max_tokens]
        tokens += new.numel()
        texts.update((start + j, tok.decode(row, skip_special_tokens=True)) for j, row in enumerate(new))
    return texts, tokens, time.perf_counter() - t0, gen_s


def run(args: argparse.Namespace) -> dict:
    from icl_router.config import RayConfig
    from icl_router.data.profile import build_prompt
    from icl_router.pretrained import check_model_path
    from icl_router.raycluster import ensure_ray
    from icl_router.testing import make_tiny_causal_lm

    questions, source = load_questions(Path(args.questions), args.n)
    prompts = [build_prompt("gsm8k", q) for q in questions]
    if args.model != "tiny":
        check_model_path(args.model, what="--model")
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        model = make_tiny_causal_lm(Path(tmp) / "tiny", seed=0, texts=questions) if args.model == "tiny" else Path(args.model).resolve()
        ensure_ray(RayConfig(address=args.address, num_cpus=8))
        v_texts, v_tokens, v_s, (v_steady_s, v_steady_tokens) = run_vllm(model, prompts, args)
        h_texts, h_tokens, h_s, h_gen_s = run_hf(model, prompts, args)
    same = sum(v_texts[i] == h_texts[i] for i in range(len(prompts)))
    return {
        "vllm_tokens_per_s": round(v_tokens / v_s, 1),
        "hf_tokens_per_s": round(h_tokens / h_s, 1),
        "speedup": round((v_tokens / v_s) / (h_tokens / h_s), 3),
        "startup_included": "yes: vLLM side from build_processor (actors + engine load; ray.init excluded), transformers side from model load",
        # undefined when the engine finishes every block at once (continuous batching of all prompts)
        "vllm_steady_tokens_per_s": round(v_steady_tokens / v_steady_s, 1) if v_steady_s > 0.05 * v_s else None,
        "hf_generate_only_tokens_per_s": round(h_tokens / h_gen_s, 1),
        "vllm_seconds": round(v_s, 2),
        "hf_seconds": round(h_s, 2),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "tokens": {"vllm": v_tokens, "hf": h_tokens},
        "same_text_fraction": round(same / len(prompts), 3),  # greedy on both sides: mostly equal; float32 ties may flip
        "threads": args.threads,
        "model": args.model,
        "dtype": args.dtype,
        "questions": source,
        "cpus": os.cpu_count(),
    }
