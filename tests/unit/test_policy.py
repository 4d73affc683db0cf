import numpy as np
import pytest

from icl_router.routing.policy import Policy, PolicyError, choose, choose_batch, restrict

P = {"small": 0.60, "mid": 0.75, "big": 0.80}
COST = {"small": 1.0, "mid": 3.0, "big": 10.0}


def test_highest_and_failover_order():
    d = choose(P)
    assert d.model == "big" and d.order == ["big", "mid", "small"]


def test_threshold_picks_cheapest_good_enough_else_best():
    assert choose(P, policy=Policy("threshold", threshold=0.7), costs=COST).model == "mid"
    assert choose(P, policy=Policy("threshold", threshold=0.5), costs=COST).model == "small"
    assert choose(P, policy=Policy("threshold", threshold=0.9), costs=COST).model == "big"


def test_margin_and_budget():
    assert choose(P, policy=Policy("margin", margin=0.05), costs=COST).model == "mid"
    assert choose(P, policy=Policy("margin", margin=0.0), costs=COST).model == "big"
    assert choose(P, policy=Policy("budget", budget=5.0), costs=COST).model == "mid"
    assert choose(P, policy=Policy("budget", budget=0.5), costs=COST).model == "small"  # nothing fits: cheapest


def test_batch_matches_single_and_ties_go_first():
    rng = np.random.default_rng(0)
    p = rng.random((50, 3)).round(1)
    c = np.array([1.0, 3.0, 10.0])
    for pol in [Policy(), Policy("threshold", threshold=0.5), Policy("margin", margin=0.1), Policy("budget", budget=4)]:
        got = choose_batch(p, policy=pol, costs=c)
        for i in range(len(p)):
            one = choose(dict(zip("abc", p[i])), policy=pol, costs=dict(zip("abc", c)))
            assert "abc"[got[i]] == one.model
    assert choose_batch(np.array([[0.5, 0.5]]), policy=Policy())[0] == 0


def test_errors_are_clear():
    with pytest.raises(PolicyError, match="pool is empty"):
        choose({})
    with pytest.raises(PolicyError, match="pool is empty"):
        choose_batch(np.zeros((3, 0)), policy=Policy())
    with pytest.raises(PolicyError, match="needs a value for 'threshold'"):
        Policy("threshold")
    with pytest.raises(PolicyError, match="unknown"):
        Policy("cheapest")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match=r"no cost for models \['big'\]"):
        choose(P, policy=Policy("budget", budget=1), costs={"small": 1, "mid": 2})
    with pytest.raises(PolicyError, match=r"unknown models \['gpt'\]"):
        restrict(P, ["gpt"])
