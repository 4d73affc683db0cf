"""Circuit breakers (pure: no Ray, no FastAPI): which parts are known to be down.

A part (a pool model, or the router) whose call fails is *open*: requests skip it at once
instead of waiting on it, and requests already waiting on it give up the moment it opens
(``call``). Only a background probe closes it again (``probe_open``), so a user request never
pays for finding out that a part is still down. A part never seen working starts open: it
is routed to only after its first probe succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

REASONS = ("open_circuit", "timeout", "error")  # why a part was skipped or failed (x-icl-router-fallback)


@dataclass
class Circuit:
    open: bool
    reason: str  # what opened it: starting, timeout, error
    since: float  # monotonic time of the last change
    failures: int = 0  # consecutive failed probes
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # set while open: wakes the calls waiting on the part


class CircuitOpened(Exception):
    """The part's circuit opened while this call waited on it (another call found it down)."""


class Circuits:
    """The breaker state of named parts. ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._c: dict[str, Circuit] = {}

    def _get(self, name: str) -> Circuit:
        if name not in self._c:
            self._c[name] = Circuit(open=True, reason="starting", since=self.clock())
            self._c[name].opened.set()
        return self._c[name]

    def is_open(self, name: str) -> bool:
        return self._get(name).open

    def trip(self, name: str, reason: str) -> None:
        c = self._get(name)
        if not c.open:
            c.open, c.reason, c.since, c.failures = True, reason, self.clock(), 0
            c.opened.set()

    def close(self, name: str) -> None:
        c = self._get(name)
        if c.open:
            c.open, c.reason, c.since, c.failures = False, "", self.clock(), 0
            c.opened = asyncio.Event()

    async def call(self, name: str, call: Coroutine[Any, Any, Any], *, timeout_s: float) -> Any:
        """``await call``, bounded by ``timeout_s`` (TimeoutError) and by the part's circuit: if it
        opens meanwhile, the call is cancelled and CircuitOpened raised. Does not trip the circuit."""
        task = asyncio.ensure_future(call)
        gate = asyncio.ensure_future(self._get(name).opened.wait())
        try:
            done, _ = await asyncio.wait({task, gate}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gate.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if gate in done:
            raise CircuitOpened(name)
        raise TimeoutError(f"{name}: no answer within {timeout_s:g} s")

    def state(self, name: str) -> str:
        return "open" if self.is_open(name) else "closed"

    def open_names(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.is_open(n)]

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of parts no longer in the pool (a deleted model starts over if it comes back)."""
        keep = set(keep)
        for n in [n for n in self._c if n not in keep]:
            del self._c[n]


async def probe_open(circuits: Circuits, names: Iterable[str], probe: Callable[[str], Awaitable[object]], *, timeout_s: float) -> dict[str, bool]:
    """Probe every open part of ``names`` at once; close those whose probe answers within ``timeout_s``.
    Returns {name: succeeded} for the parts probed."""
    todo = circuits.open_names(names)

    async def one(name: str) -> bool:
        try:
            await asyncio.wait_for(probe(name), timeout_s)
            return True
        except Exception:  # down, starting, or too slow: stays open
            return False

    results = await asyncio.gather(*(one(n) for n in todo))
    for name, ok in zip(todo, results):
        if ok:
            circuits.close(name)
        else:
            circuits._get(name).failures += 1
    return dict(zip(todo, results))
