"""Calls to a pool model's LLMServer (``ray.serve.llm``) through its deployment handle.

Its methods are generators, called with ``options(stream=True)``: a non-streaming request yields
one response, a streaming one lists of SSE strings. Every caller wants the same two things:
the first output, with the generation cancelled if that fails (``first_output``), and the
engine's own error body told apart from an answer (``engine_error``).
"""

from __future__ import annotations

import time
from typing import Any

from icl_router.serving.failover import ModelRefused


def engine_error(first: Any) -> Any | None:
    """The engine's ErrorResponse in a first output, or None. ray.serve.llm yields its engine's
    ErrorResponse (not the public subclass), so it is matched by shape."""
    items = first if isinstance(first, list) else [first]
    return next((x for x in items if hasattr(x, "error") and not hasattr(x, "choices")), None)


async def first_output(gen: Any, *, model: str) -> Any:
    """The first output of ``gen`` (a handle's streaming call). If it fails, is given up on (a
    timeout cancels this coroutine) or is an error body, the generation is cancelled; an error
    body raises :class:`ModelRefused` (4xx: the request's fault) or RuntimeError (5xx)."""
    try:
        first = await gen.__anext__()
    except BaseException:
        gen.cancel()
        raise
    err = engine_error(first)
    if err is not None:
        gen.cancel()
        code = int(err.error.code or 500)
        if code < 500:
            raise ModelRefused(code, err.error.message, code=str(err.error.type or "invalid_request_error"), param=err.error.param)
        raise RuntimeError(f"{model} answered {code}: {err.error.message}")
    return first


async def probe(handle: Any, model: str) -> None:
    """A 1-token completion: raises unless the model's replica is up and its engine answers (a 4xx
    answer counts as up)."""
    from ray.serve.llm.openai_api_models import CompletionRequest

    gen = handle.options(stream=True).completions.remote(CompletionRequest(model=model, prompt="ping", max_tokens=1))
    try:
        await first_output(gen, model=model)
    except ModelRefused:
        pass
    finally:
        gen.cancel()


async def ask_chat(handle: Any, messages: list[dict[str, str]], *, model_id: str, sampling: dict[str, Any], max_tokens: int | None = None) -> Any:
    """One chat completion (non-streaming) as an ``onboarding.Answer``; a 4xx is ``RefusedByModel``.
    ``max_tokens``: this question's limit over ``sampling``'s (the profile job's per-task limit)."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from icl_router.serving.onboarding import Answer, RefusedByModel

    t0 = time.perf_counter()
    req = ChatCompletionRequest(model=model_id, messages=messages, **{**sampling, **({"max_tokens": max_tokens} if max_tokens else {})})
    try:
        first = await first_output(handle.options(stream=True).chat.remote(req), model=model_id)
    except ModelRefused as e:
        raise RefusedByModel(f"{model_id} refused an anchor with {e.status}: {e.message}") from None
    usage = getattr(first, "usage", None)
    return Answer(first.choices[0].message.content or "", getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None),
                  time.perf_counter() - t0)
