"""Routing one request and failing over, without Ray: the pure loop (serving.failover), the circuit
breakers (serving.circuits) and the SSE relay (serving.sse), driven by fake calls.

A call that "hangs" waits on an event nobody sets, so its timeout is certain, whatever the
machine's speed; no test measures time.
"""

import asyncio

import pytest

from icl_router.routing.decision import DecisionParams
from icl_router.routing.policy import Policy
from icl_router.serving.circuits import Circuits, probe_open
from icl_router.serving.failover import ROUTER, Exhausted, ModelRefused, RouterScores, failover, fallback_header, plan
from icl_router.serving.sse import relay

PRIORS = {"a": 0.6, "b": 0.7, "c": 0.5}
COSTS = {"a": 0.01, "b": 0.02, "c": 0.001}


def run(coro):
    return asyncio.run(coro)


async def hang(*_):
    await asyncio.Event().wait()


def closed(*names: str) -> Circuits:
    c = Circuits()
    for n in names:
        c.close(n)
    return c


def scorer(p: dict[str, float], mass: float | None = None, calls: list | None = None, min_gain: float | None = None):
    async def score(text: str) -> RouterScores:
        if calls is not None:
            calls.append(text)
        return RouterScores(p, mass, {"embed": 1.0}, min_gain)

    return score


async def boom(_: str):
    raise RuntimeError("replica died")


HIGHEST = Policy()


def _plan(score, circuits, *, policy=HIGHEST, params=None, candidates=("a", "b", "c"), priors=PRIORS, timeout_s=1.0, pinned=False):
    return run(plan("q", candidates=list(candidates), priors=priors, costs=COSTS, policy=policy, params=params, score=score,
                    circuits=circuits, timeout_s=timeout_s, pinned=pinned))


# ---- plan ------------------------------------------------------------------------------------


def test_plan_routes_by_the_routers_p_and_orders_the_rest_by_p():
    p = _plan(scorer({"a": 0.9, "b": 0.2, "c": 0.4}), closed(ROUTER))
    assert (p.decision.model, p.decision.order, p.scored_by, p.skipped) == ("a", ["a", "c", "b"], "router", [])
    assert p.timing == {"embed": 1.0} and p.decision.default is None  # no decision layer: no guard


@pytest.mark.parametrize("router, reason", [(boom, "error"), (hang, "timeout")])
def test_a_failing_router_means_routing_by_the_priors_and_its_circuit_opens(router, reason):
    circuits = closed(ROUTER)
    p = _plan(router, circuits, timeout_s=0.01)
    assert p.scored_by == "prior" and p.skipped == [(ROUTER, reason)] and circuits.is_open(ROUTER)
    assert p.decision.model == "b" and p.decision.p == PRIORS  # the best profile accuracy, not a coin at p = 0.5


def test_an_open_router_circuit_is_not_called():
    calls = []
    p = _plan(scorer({"a": 0.9, "b": 0.1, "c": 0.1}, calls=calls), Circuits())  # never seen working: open
    assert calls == [] and p.skipped == [(ROUTER, "open_circuit")] and p.decision.model == "b"


def test_the_decision_layer_guards_the_default_and_reports_the_adjusted_p():
    params = DecisionParams(tau=0.1, prior_weight=1.0, min_gain=0.05)
    raw = {"a": 0.76, "b": 0.72, "c": 0.1}
    # mass 3: p moves 1/4 of the way to the prior: a 0.72, b 0.715 -> a's gain over the default b is under 0.05
    guarded = _plan(scorer(raw, mass=3.0), closed(ROUTER), params=params)
    assert guarded.decision.default == "b" and guarded.decision.model == "b"
    assert guarded.decision.p["a"] == pytest.approx(0.75 * 0.76 + 0.25 * 0.6, abs=1e-9)
    bold = _plan(scorer(raw, mass=3.0), closed(ROUTER), params=params.replace(min_gain=0.0))
    assert bold.decision.model == "a" and bold.decision.default == "b"
    # the router replica's margin for its pool (refitted when the pool changed) wins, unless the request set one
    pool = _plan(scorer(raw, mass=3.0, min_gain=0.0), closed(ROUTER), params=params)
    assert pool.decision.model == "a" and pool.params.min_gain == 0.0
    pinned = _plan(scorer(raw, mass=3.0, min_gain=0.0), closed(ROUTER), params=params, pinned=True)
    assert pinned.decision.model == "b" and pinned.params.min_gain == pytest.approx(0.05)
    # the router down: no evidence (mass 0) -> every p is its prior, the default stands
    down = _plan(boom, closed(ROUTER), params=params)
    assert down.decision.model == "b" and down.decision.p == pytest.approx(PRIORS, abs=1e-9)


def test_the_default_follows_the_profiles_unless_configured():
    params = DecisionParams(min_gain=0.2)
    raw = {"a": 0.5, "b": 0.5, "c": 0.5, "new": 0.5}
    priors = {**PRIORS, "new": 0.9}  # a newly registered model with the best profile accuracy
    p = _plan(scorer(raw, mass=10.0), closed(ROUTER), params=params, candidates=("a", "b", "c", "new"), priors=priors)
    assert p.decision.default == "new"
    fixed = _plan(scorer(raw, mass=10.0), closed(ROUTER), params=params.replace(default_model="c"), candidates=("a", "b", "c", "new"), priors=priors)
    assert fixed.decision.default == "c"
    # a configured default that is not a candidate of this request: the best prior among them
    sub = _plan(scorer(raw, mass=10.0), closed(ROUTER), params=params.replace(default_model="c"), candidates=("a", "b"))
    assert sub.decision.default == "b"


def test_the_cost_policy_trades_p_for_money():
    p = _plan(scorer({"a": 0.8, "b": 0.82, "c": 0.75}), closed(ROUTER), policy=Policy("cost", cost_weight=10.0))
    assert p.decision.model == "c"  # 0.75 - 0.01 beats 0.8 - 0.1 and 0.82 - 0.2


# ---- failover --------------------------------------------------------------------------------


def caller(behaviour: dict, calls: list):
    async def call(model: str):
        calls.append(model)
        b = behaviour.get(model, "ok")
        if b == "ok":
            return f"answer of {model}", None
        if b == "hang":
            await hang()
        if b == "refuse":
            raise ModelRefused(400, "prompt too long", code="BadRequestError", param="messages")
        raise RuntimeError(f"{model} failed")

    return call


def test_failover_tries_the_order_until_a_model_answers_and_opens_the_failed_circuits():
    calls, circuits = [], closed("a", "b", "c")
    served = run(failover(["a", "b", "c"], call=caller({"a": "error", "b": "hang"}, calls), circuits=circuits, timeout_s=0.01))
    assert (served.model, served.first, calls) == ("c", "answer of c", ["a", "b", "c"])
    assert served.skipped == [("a", "error"), ("b", "timeout")] and fallback_header(served.skipped) == "a:error;b:timeout"
    assert circuits.open_names(["a", "b", "c"]) == ["a", "b"]
    # the next request does not wait on them: skipped without a call
    calls.clear()
    again = run(failover(["a", "b", "c"], call=caller({}, calls), circuits=circuits, timeout_s=0.01))
    assert calls == ["c"] and again.skipped == [("a", "open_circuit"), ("b", "open_circuit")]


def test_requests_waiting_on_a_part_move_on_when_another_finds_it_down():
    """Two requests wait on model a (and the router): when one learns it is down, the other stops
    waiting at once. The timeouts are far away: only the circuit can end the wait."""

    async def scenario():
        circuits, released = closed(ROUTER, "a", "b"), asyncio.Event()

        async def call(model):
            if model == "a":
                await released.wait()
                raise RuntimeError("a died")
            return f"answer of {model}", None

        async def stuck(model):
            if model == "a":
                await hang()
            return f"answer of {model}", None

        waiting = asyncio.ensure_future(failover(["a", "b"], call=stuck, circuits=circuits, timeout_s=3600))
        routing = asyncio.ensure_future(plan("q", candidates=["a", "b"], priors=PRIORS, costs=COSTS, policy=HIGHEST, params=None,
                                             score=hang, circuits=circuits, timeout_s=3600))
        failing = asyncio.ensure_future(failover(["a", "b"], call=call, circuits=circuits, timeout_s=3600))
        await asyncio.sleep(0)
        released.set()
        first = await failing
        circuits.trip(ROUTER, "error")  # what a failed router call does
        return first, await waiting, await routing

    first, second, routed = run(scenario())
    assert first.model == "b" and first.skipped == [("a", "error")]
    assert second.model == "b" and second.skipped == [("a", "open_circuit")]
    assert routed.scored_by == "prior" and routed.skipped == [(ROUTER, "open_circuit")]


def test_a_models_4xx_passes_through_and_opens_nothing():
    calls, circuits = [], closed("a", "b")
    with pytest.raises(ModelRefused) as e:
        run(failover(["a", "b"], call=caller({"a": "refuse"}, calls), circuits=circuits, timeout_s=1.0))
    assert e.value.status == 400 and calls == ["a"] and circuits.open_names(["a", "b"]) == []


def test_exhausted_names_every_model_and_why():
    circuits = closed("a")
    with pytest.raises(Exhausted) as e:
        run(failover(["a", "b"], call=caller({"a": "error"}, []), circuits=circuits, timeout_s=1.0))
    assert e.value.skipped == [("a", "error"), ("b", "open_circuit")]


def test_more_models_are_asked_for_only_when_the_order_runs_out():
    asked, calls = [], []

    async def more():
        asked.append(1)
        return ["a", "c"]  # "a" is already tried: not again

    ok = run(failover(["a"], call=caller({}, calls), circuits=closed("a", "c"), timeout_s=1.0, more=more))
    assert ok.model == "a" and asked == []
    served = run(failover(["a"], call=caller({"a": "error"}, calls := []), circuits=closed("a", "c"), timeout_s=1.0, more=more))
    assert served.model == "c" and asked == [1] and calls == ["a", "c"] and served.skipped == [("a", "error")]


# ---- circuits ------------------------------------------------------------------------------------


def test_a_probe_closes_a_circuit_and_only_open_ones_are_probed():
    circuits, probed = Circuits(clock=lambda: 0.0), []
    assert circuits.is_open("a") and circuits.state("a") == "open"  # never seen working

    async def probe(name: str):
        probed.append(name)
        if name == "b":
            raise RuntimeError("still down")

    circuits.close("c")
    out = run(probe_open(circuits, ["a", "b", "c"], probe, timeout_s=1.0))
    assert out == {"a": True, "b": False} and sorted(probed) == ["a", "b"]
    assert circuits.state("a") == "closed" and circuits.is_open("b")
    circuits.trip("a", "timeout")
    assert run(probe_open(circuits, ["a"], hang, timeout_s=0.01)) == {"a": False} and circuits.is_open("a")
    circuits.forget(["a"])
    assert circuits.open_names(["a", "c"]) == ["a", "c"]  # c forgotten: starts over, open until probed


# ---- SSE -----------------------------------------------------------------------------------------


class Stream:
    def __init__(self, items, end="stop"):
        self.items, self.end, self.cancelled = list(items), end, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.end == "stop":
            raise StopAsyncIteration
        if self.end == "hang":
            await hang()
        raise RuntimeError("replica died")

    def cancel(self):
        self.cancelled = True


async def collect(first, stream, broken):
    return [s async for s in relay(first, stream, stall_s=0.01, cancel=stream.cancel, on_broken=broken.append)]


def test_the_loop_imports_neither_ray_nor_fastapi():
    import subprocess
    import sys

    code = ("import sys, icl_router.serving.failover, icl_router.serving.circuits, icl_router.serving.sse; "
            "print(sorted(m for m in ('ray', 'fastapi', 'starlette', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("end, reason", [("stop", None), ("error", "error"), ("hang", "timeout")])
def test_a_stream_is_relayed_and_a_broken_one_ends_with_an_error_event(end, reason):
    stream, broken = Stream(["data: 2\n\n", ["data: 3\n\n"]], end=end), []
    out = run(collect(["data: 1\n\n"], stream, broken))
    assert out[:3] == ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n"]
    if reason is None:
        assert len(out) == 3 and not broken and not stream.cancelled
    else:
        assert '"code": "stream_broken"' in out[3] and out[4] == "data: [DONE]\n\n" and broken == [reason] and stream.cancelled


def test_a_query_whose_task_has_anchors_is_planned_with_the_task_layer():
    task = DecisionParams(tau=0.1, min_gain=0.0)
    params = DecisionParams(tau=0.1, min_gain=1.0, task=task)  # the plain layer never leaves the default (b)
    p = {"a": 0.95, "b": 0.2, "c": 0.1}

    async def task_score(text: str) -> RouterScores:
        return RouterScores(p, 5.0, {}, 0.0, task_row=True)  # the replica's guard for the task layer

    assert _plan(scorer(p, mass=5.0, min_gain=1.0), closed(ROUTER), params=params).decision.model == "b"
    planned = _plan(task_score, closed(ROUTER), params=params)
    assert planned.decision.model == "a" and planned.params == task and planned.task_layer
