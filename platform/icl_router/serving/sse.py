"""Server-sent events: a model's stream relayed to the client, ended cleanly if the model breaks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any


def flat(item: Any) -> list[Any]:
    return item if isinstance(item, list) else [item]


def event(item: Any) -> str:
    """ray.serve.llm yields SSE strings (``data: ...``); anything else is a pydantic chunk."""
    return item if isinstance(item, str) else f"data: {item.model_dump_json()}\n\n"


def error_event(reason: str) -> str:
    err = {"message": f"the model failed mid-stream ({reason}); the answer is incomplete", "type": "server_error", "code": "stream_broken"}
    return f"data: {json.dumps({'error': err})}\n\n"


async def relay(
    first: Any, rest: AsyncIterator[Any], *, stall_s: float, cancel: Callable[[], None], on_broken: Callable[[str], None]
) -> AsyncIterator[str]:
    """The first output, then the rest. A stream that raises or is silent for ``stall_s`` ends with an
    OpenAI-style error event and ``[DONE]`` (the openai client raises APIError on it), never a hung
    connection; ``on_broken(reason)`` is told (reason: timeout or error)."""
    for s in flat(first):
        yield event(s)
    while True:
        try:
            item = await asyncio.wait_for(rest.__anext__(), stall_s)
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:  # the client went away: stop the generation
            cancel()
            raise
        except Exception as e:
            cancel()
            reason = "timeout" if isinstance(e, TimeoutError) else "error"
            on_broken(reason)
            yield error_event(reason)
            yield "data: [DONE]\n\n"
            return
        for s in flat(item):
            yield event(s)
