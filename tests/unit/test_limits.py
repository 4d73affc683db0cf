"""Per-key rate limits and budgets (serving/limits.py) on a clock the test moves: no wall-clock waits."""

from __future__ import annotations

import pytest

from icl_router.config import AuthConfig, ConfigError, ServeConfig, load_config
from icl_router.serving.limits import RateLimiter, SpendLedger, SpendTotals


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def auth(**limits) -> AuthConfig:
    return AuthConfig.model_validate({"api_keys": ["team-a:sk-a", "sk-b"], "admin_keys": ["sk-admin"], "limits": limits})


def test_rate_limit_admits_the_burst_then_refuses_with_retry_after():
    clock = Clock()
    rl = RateLimiter(auth(**{"team-a": {"requests_per_minute": 60, "burst": 3}}), clock)
    assert [rl.admit("team-a") for _ in range(3)] == [None, None, None]
    over = rl.admit("team-a")
    assert over.status == 429 and over.code == "rate_limit_exceeded" and over.headers == {"Retry-After": "1"}
    assert "key 'team-a' is over its rate limit of 60 requests per minute (auth.limits.team-a.requests_per_minute)" in over.message
    assert 0.9 < over.retry_after_s <= 1.0  # one request per second: the next is a second away
    clock.t += over.retry_after_s
    assert rl.admit("team-a") is None and rl.admit("team-a") is not None
    assert all(rl.admit("key-other") is None for _ in range(100))  # a key without limits


def test_each_replica_admits_its_share():
    clock = Clock()
    rl = RateLimiter(auth(**{"team-a": {"requests_per_minute": 120, "burst": 4}}), clock, share=0.5)  # two ingress replicas
    assert sum(rl.admit("team-a") is None for _ in range(10)) == 2
    clock.t += 60
    assert sum(rl.admit("team-a") is None for _ in range(100)) == 2  # the bucket holds the replica's share of the burst


def test_budget_refuses_once_spent_and_names_the_limit():
    clock = Clock()
    ledger = SpendLedger(auth(**{"team-a": {"budget": 0.01}}), clock)
    for _ in range(4):
        assert ledger.admit("team-a") is None
        ledger.add("team-a", 0.003)
    over = ledger.admit("team-a")
    assert over.status == 402 and over.code == "budget_exceeded"
    assert "key 'team-a' has spent 0.012 of its budget of 0.01 (auth.limits.team-a.budget" in over.message
    assert ledger.admit("key-x") is None


def test_spend_is_the_services_across_replicas_and_windows():
    clock = Clock()
    a = auth(**{"team-a": {"budget": 0.01, "budget_window_s": 3600}})
    registry, r1, r2 = SpendTotals(a, clock), SpendLedger(a, clock), SpendLedger(a, clock)
    r1.add("team-a", 0.006)
    r2.add("team-a", 0.005)
    for r in (r1, r2, r1):  # each replica's background sync, r1 twice: it learns r2's spend on its next sync
        r.merge(registry.add(r.take_unsent()))
    assert r1.spent("team-a") == pytest.approx(0.011, abs=1e-12) and r1.admit("team-a") is not None  # one replica sees the other's spend
    r2.merge(registry.add({}))
    assert r2.admit("team-a") is not None and "per 3600 s window" in r2.admit("team-a").message
    clock.t += 3600  # a new window
    r2.merge(registry.add({}))
    assert r2.spent("team-a") == 0.0 and r2.admit("team-a") is None
    unsent = {"team-a": 0.002}
    r1.merge(registry.totals, unsent_back=unsent)  # a sync that failed keeps its spend for the next
    assert r1.spent("team-a") == pytest.approx(0.002, abs=1e-12)


def test_limits_are_typed_config():
    with pytest.raises(ConfigError, match=r"auth\.limits\.team-a\.requests_per_minute"):
        load_config(ServeConfig, None, ["router.path=/r", "pool=[{name: m, path: /m}]", "auth.limits.team-a.requests_per_minute=0"])
    with pytest.raises(ConfigError, match=r"auth\.default_limits\.budgett: unknown key"):
        load_config(ServeConfig, None, ["router.path=/r", "pool=[{name: m, path: /m}]", "auth.default_limits.budgett=1"])
