"""Per-key rate limits and budgets (pure: no Ray, no FastAPI; the clock is injected).

- **Rate**: a token bucket per key name, refilled at ``requests_per_minute`` and holding at most
  ``burst`` requests. Each ingress replica keeps its own buckets at its share of the rate (the
  config's rate divided by the ingress replicas), so the service as a whole admits the configured
  rate. A request over it gets 429 with ``Retry-After``: when the bucket holds a request again.
- **Budget**: spend in the pool's cost units (each pool model's ``cost``, per answered request),
  per key name. Each ingress replica adds what it served to its unsent spend; its background loop
  sends that to the registry, which keeps the service's totals, and takes the totals back. A key
  whose known spend (the last totals plus what this replica has not sent yet) has reached its
  budget gets 402 naming the budget; the overshoot is bounded by what other replicas served since
  their last sync. ``budget_window_s`` starts a new window (spend back to 0) that often.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from icl_router.config import AuthConfig, KeyLimits
from icl_router.serving.api_errors import ApiError


def limits_for(auth: AuthConfig, key: str) -> KeyLimits:
    return auth.limits.get(key, auth.default_limits)


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """Token buckets per key; ``share`` is this replica's fraction of each key's rate."""

    auth: AuthConfig
    clock: Callable[[], float]
    share: float = 1.0
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, key: str) -> ApiError | None:
        """None, or the 429 to answer (``retry_after_s``: when the key's bucket holds a request again)."""
        lim = limits_for(self.auth, key)
        if lim.requests_per_minute is None:
            return None
        rate = lim.requests_per_minute * self.share / 60.0  # requests per second for this replica
        cap = max(1.0, (lim.burst if lim.burst is not None else lim.requests_per_minute) * self.share)
        now = self.clock()
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = _Bucket(cap, now)
        b.tokens = min(cap, b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return None
        wait = (1.0 - b.tokens) / rate
        err = ApiError(429, f"key {key!r} is over its rate limit of {lim.requests_per_minute:g} requests per minute "
                       f"(auth.limits.{key}.requests_per_minute); retry after {wait:.1f} s", code="rate_limit_exceeded", type_="rate_limit_error",
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})
        err.retry_after_s = wait
        return err


@dataclass
class SpendLedger:
    """This replica's view of each key's spend: the service's totals (from the registry) plus what it has not sent."""

    auth: AuthConfig
    clock: Callable[[], float]
    totals: dict[str, float] = field(default_factory=dict)  # the registry's, as of the last sync
    unsent: dict[str, float] = field(default_factory=dict)

    def spent(self, key: str) -> float:
        return self.totals.get(key, 0.0) + self.unsent.get(key, 0.0)

    def admit(self, key: str) -> ApiError | None:
        """None, or the 402 to answer."""
        lim = limits_for(self.auth, key)
        if lim.budget is None:
            return None
        spent = self.spent(key)
        if spent < lim.budget:
            return None
        window = f" per {lim.budget_window_s:g} s window" if lim.budget_window_s else ""
        return ApiError(402, f"key {key!r} has spent {spent:.6g} of its budget of {lim.budget:g}{window} (auth.limits.{key}.budget, in the "
                        "pool's cost units: the answering model's cost per request); raise the budget or use another key",
                        code="budget_exceeded", type_="insufficient_quota")

    def add(self, key: str, cost: float) -> None:
        if cost:
            self.unsent[key] = self.unsent.get(key, 0.0) + cost

    def take_unsent(self) -> dict[str, float]:
        out, self.unsent = self.unsent, {}
        return out

    def merge(self, totals: Mapping[str, float], *, unsent_back: Mapping[str, float] | None = None) -> None:
        """The registry's totals after a sync; ``unsent_back``: a sync that failed gives its spend back."""
        self.totals = dict(totals)
        for k, v in (unsent_back or {}).items():
            self.unsent[k] = self.unsent.get(k, 0.0) + v


@dataclass
class SpendTotals:
    """The registry's side: the service's spend per key, in windows per the key's ``budget_window_s``."""

    auth: AuthConfig
    clock: Callable[[], float]
    totals: dict[str, float] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # key -> start of its current window

    def add(self, deltas: Mapping[str, float]) -> dict[str, float]:
        now = self.clock()
        for key, v in deltas.items():
            window = limits_for(self.auth, key).budget_window_s
            start = self.started.setdefault(key, now)
            if window and now - start >= window:
                self.totals[key], self.started[key] = 0.0, now - (now - start) % window
            self.totals[key] = self.totals.get(key, 0.0) + float(v)
        for key, start in list(self.started.items()):  # windows that ran out with no spend
            window = limits_for(self.auth, key).budget_window_s
            if window and now - start >= window:
                self.totals[key], self.started[key] = 0.0, now - (now - start) % window
        return dict(self.totals)
