"""Routing overhead of the service: requests routed through the router vs passed straight to the same pool model.

Both sides go through the same app, to the same model, with the same prompts, interleaved
(routed, direct, routed, ...) one at a time so both see the same machine load. The routed
side names the model as its only candidate (``routing.models``): the router still embeds and
scores the query against the whole pool and the policy runs, so the difference is the whole
routing path (embedding, batched scoring, the extra deployment hop, the policy).
overhead_*: percentiles of the per-pair difference (routed - direct).

Every request's text is distinct (warm-up included), so the router's query-embedding cache never
hits: the figures are the uncached path. The router's own stage times (x-icl-router-timing) are
printed too: queue (waiting for its batch), embed, score, and the rest of the router call
(handle hop both ways, serialisation, the batch thread) as ``hop``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PROMPTS = [
    "What is the sum of 17 and 25?",
    "Write a Python function that reverses a list.",
    "Who wrote Hamlet?",
    "Which option is correct? A B C D.",
    "Translate 'good morning' into French.",
    "How many days are there in a leap year?",
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="serve/demo.yaml", help="serve config to start (ignored with --url)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--url", help="base URL (…/v1) of a running service; default: start one from --config")
    p.add_argument("--api-key", default=None, help="default: the config's first API key")
    p.add_argument("--model", default=None, help="pool model both sides reach (default: the first routable one)")
    p.add_argument("--requests", type=int, default=200, help="requests per side")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=1)


def _until_up(fn: Callable[[], Any], bound_s: float = 300.0, *, sleep: Callable[[float], None] = time.sleep) -> Any:
    """``fn()``, again while the service answers 503 (for at most ``bound_s``): /ready means the router
    and one pool model answered, and a model whose probe has not closed its circuit yet is refused until it does."""
    import openai

    t0 = time.monotonic()
    while True:
        try:
            return fn()
        except openai.APIStatusError as e:
            if e.status_code != 503 or time.monotonic() - t0 > bound_s:
                raise
            sleep(float(e.response.headers.get("retry-after", 1)))


def run(args: argparse.Namespace) -> dict:
    import openai

    from icl_router.config import ServeConfig, load_config

    cfg = load_config(ServeConfig, args.config, args.overrides)
    url = args.url
    if url is None:
        from icl_router.serving.app import start, wait_ready

        url = start(cfg)
        wait_ready(url, app_name=cfg.app_name, timeout_s=1800)
    from icl_router.serving.auth import Keys

    key = args.api_key or next(iter(Keys.from_config(cfg.auth).api), "none")  # the bare key (a config entry may be name:key)
    client = openai.OpenAI(base_url=url, api_key=key, timeout=60, max_retries=0)

    def call(i: int, routed: bool) -> tuple[float, dict]:
        messages = [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (#{i}{'r' if routed else 'd'})"}]
        extra = {"routing": {"models": [model]}} if routed else None
        t0 = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model="icl-router" if routed else model, messages=messages, max_tokens=args.max_tokens, temperature=0.0, extra_body=extra
        )
        raw.parse()
        return (time.perf_counter() - t0) * 1e3, raw.headers

    model = args.model
    if model is None:
        headers = _until_up(lambda: client.chat.completions.with_raw_response.create(
            model="icl-router", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=1).headers)
        model = headers["x-icl-router-order"].split(",")[0]
    for i in range(args.warmup):
        _until_up(lambda i=i: call(-1 - i, i % 2 == 0))  # negative numbers: no text the measured requests send
    direct, routed, scoring, errors, cache_hits = [], [], [], 0, 0
    stages: dict[str, list[float]] = {"queue": [], "embed": [], "score": [], "hop": []}
    for i in range(args.requests):
        for side in (True, False) if i % 2 == 0 else (False, True):  # alternate who goes first
            try:
                ms, headers = call(i, side)
            except openai.APIError:
                errors += 1
                continue
            if side:
                if headers.get("x-icl-router-model") != model:
                    errors += 1
                    continue
                routed.append(ms)
                scoring.append(float(headers["x-icl-router-scoring-ms"]))
                t = dict(kv.split("=") for kv in headers.get("x-icl-router-timing", "").split(";") if kv)
                cache_hits += int(float(t.get("cached", 0)) > 0)  # 0 unless texts repeat: then the figure is not the uncached path
                for k in ("queue", "embed", "score"):
                    stages[k].append(float(t.get(k, "nan")))
                stages["hop"].append(scoring[-1] - sum(stages[k][-1] for k in ("queue", "embed", "score")))
            else:
                direct.append(ms)
    n = min(len(direct), len(routed))
    diff = np.array(routed[:n]) - np.array(direct[:n])  # per pair
    return {
        "model": model,
        "direct_p50_ms": round(float(np.median(direct)), 2),
        "routed_p50_ms": round(float(np.median(routed)), 2),
        "overhead_p50_ms": round(float(np.median(diff)), 2),
        "overhead_p99_ms": round(float(np.percentile(diff, 99)), 2),
        "scoring_call_p50_ms": round(float(np.median(scoring)), 2),  # ingress -> router deployment -> back
        **{f"router_{k}_p50_ms": round(float(np.median(v)), 2) for k, v in stages.items()},  # inside that call
        "requests": len(direct) + len(routed),
        "errors": errors,
        "cache_hits": cache_hits,
    }
