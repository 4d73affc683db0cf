import numpy as np
import pytest

from icl_router.routing.policy import Policy, PolicyError, choose, choose_batch

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


def test_cost_policy_trades_p_against_money():
    assert choose(P, policy=Policy("cost", cost_weight=0.0), costs=COST).model == "big"
    assert choose(P, policy=Policy("cost", cost_weight=0.01), costs=COST).model == "mid"  # 0.73 > 0.70, 0.59
    assert choose(P, policy=Policy("cost", cost_weight=1.0), costs=COST).model == "small"
    with pytest.raises(PolicyError, match="needs a value for 'cost_weight'"):
        Policy("cost")
    with pytest.raises(PolicyError, match="cost_weight must be >= 0"):
        Policy("cost", cost_weight=-1.0)


def test_the_decision_layer_guards_the_default_and_shrinks_without_evidence():
    from icl_router.routing.decision import DecisionParams

    prior = {"small": 0.5, "mid": 0.6, "big": 0.7}
    guard = DecisionParams(min_gain=0.1)
    d = choose({"small": 0.9, "mid": 0.6, "big": 0.85}, prior=prior, mass=100.0, params=guard)
    assert d.model == "big" and d.default == "big"  # 0.9 beats the default by 0.05 only
    assert choose({"small": 0.99, "mid": 0.6, "big": 0.85}, prior=prior, mass=100.0, params=guard).model == "small"
    shrink = DecisionParams(prior_weight=1.0)
    far = choose({"small": 0.99, "mid": 0.6, "big": 0.5}, prior=prior, mass=0.0, params=shrink)  # no evidence: the priors
    assert far.model == "big" and far.p == pytest.approx(prior)
    assert choose({"small": 0.99, "mid": 0.6, "big": 0.5}, prior=prior, mass=1e6, params=shrink).model == "small"
    # the cost policy's default is the best prior utility, and its guard works in utility
    prior_u = {"small": 0.5, "mid": 0.65, "big": 0.7}  # utilities at 0.01 a dollar: 0.49, 0.62, 0.60
    d = choose(P, policy=Policy("cost", cost_weight=0.01), costs=COST, prior=prior_u, mass=1e6, params=DecisionParams(min_gain=0.5))
    assert d.model == "mid" == d.default
    with pytest.raises(PolicyError, match=r"no prior .* \['big'\]"):
        choose(P, prior={"small": 0.5, "mid": 0.5}, mass=1.0, params=guard)
