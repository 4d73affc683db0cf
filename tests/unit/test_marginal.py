"""The marginal-gain estimators (routing/marginal.py) on planted pools: no router, p from the anchors' kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_router.model.evidence import TAUS, AnchorEvidence
from icl_router.routing.decision import DecisionParams, cosine
from icl_router.routing.marginal import (
    ESTIMATORS,
    Inputs,
    ValuationError,
    Valuer,
    candidate_gains,
    evidence_logit,
    greedy_pools,
    removal_gains,
)
from icl_router.routing.policy import Policy

W0 = np.array([0.0, 1.0, 0.0, 0.0])  # the evidence head at its initial weights: the tau=0.1 kernel rate alone


def planted(seed: int = 0):
    return planted_with_anchors(seed)[:4]


def planted_with_anchors(seed: int = 0):
    """Twelve clusters of queries; pool: two all-round models (~60%); candidates: a niche expert
    (right ~95% on the first four clusters, ~15% elsewhere), a weaker coin-flip model (~55%),
    and a duplicate of pool model 0. p is the anchor evidence at its initial weights."""
    rng = np.random.default_rng(seed)
    C, K, Q = 12, 240, 600
    centers = rng.normal(size=(C, 16)) * 3
    a_cl, q_cl = np.arange(K) % C, np.arange(Q) % C
    anchors = centers[a_cl] + rng.normal(size=(K, 16))
    queries = centers[q_cl] + rng.normal(size=(Q, 16))
    prof = np.stack(
        [
            rng.random(K) < 0.6,
            rng.random(K) < 0.6,
            rng.random(K) < np.where(a_cl < C // 3, 0.95, 0.15),
            rng.random(K) < 0.55,
        ]
    )
    prof = np.concatenate([prof, prof[:1]])  # the duplicate of "pool-a"
    models = ["pool-a", "pool-b", "niche", "coin", "dup-a"]
    sim = cosine(queries, anchors)
    p = 1 / (1 + np.exp(-evidence_logit(sim, prof, W0, 0.0, TAUS)))  # [Q, T]
    return models, p, prof, sim, anchors


def subset_p(sim, prof):
    return lambda keep: 1 / (1 + np.exp(-evidence_logit(sim, prof, W0, 0.0, TAUS, keep=keep)))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("params", [None, DecisionParams(tau=0.1, prior_weight=1.0, min_gain=0.02)], ids=["plain", "decision"])
def test_niche_expert_ranks_first_and_a_duplicate_adds_nothing(estimator, params):
    models, p, prof, sim = planted()
    valuer = Valuer(Inputs(models, p, prof, sim, params=params, p_on_anchors=subset_p(sim, prof)), estimator=estimator)
    out = candidate_gains(valuer, [0, 1], [2, 3, 4])
    assert [set(r) for r in out] == [{"model", "gain", "traffic_share", "cost_change"}] * 3
    by = {r["model"]: r for r in out}
    assert out[0]["model"] == "niche" and by["niche"]["gain"] > 5.0
    assert 0.2 < by["niche"]["traffic_share"] < 0.5  # about its cluster's third of the queries
    assert abs(by["dup-a"]["gain"]) < 1e-9 and by["dup-a"]["traffic_share"] == 0.0  # ties go to the pool model
    assert by["dup-a"]["cost_change"] is None  # no costs given


def test_the_winners_curse_inflates_only_the_naive_estimate():
    models, p, prof, sim = planted()
    gain = {e: {r["model"]: r["gain"] for r in candidate_gains(Valuer(Inputs(models, p, prof, sim), estimator=e), [0, 1], [3])} for e in ("naive", "eb")}
    # the coin-flip model's p is high by chance on some queries: naive counts them as gains
    assert gain["naive"]["coin"] > 0.3
    assert gain["eb"]["coin"] < 0 < gain["naive"]["coin"]


def test_removals_costs_and_greedy_pools():
    models, p, prof, sim = planted()
    costs = np.array([1.0, 2.0, 0.5, 0.1, 1.0]) * 1e-3
    valuer = Valuer(Inputs(models, p, prof, sim, costs=costs, policy=Policy(kind="cost", cost_weight=10.0)), estimator="eb")
    cands = candidate_gains(valuer, [0, 1], [2, 3, 4])
    assert [r["gain"] for r in cands] == sorted((r["gain"] for r in cands), reverse=True)
    niche = next(r for r in cands if r["model"] == "niche")
    assert niche["cost_change"] < 0  # it takes queries from dearer models
    rem = removal_gains(valuer, [0, 1, 2])
    assert {r["model"] for r in rem} == {"pool-a", "pool-b", "niche"}
    assert next(r for r in rem if r["model"] == "niche")["gain"] < -5.0  # losing the expert hurts most
    assert sum(r["traffic_share"] for r in rem) == pytest.approx(1.0, abs=1e-3)  # rounded to 4 places
    only = removal_gains(valuer, [2])
    assert only[0]["gain"] == pytest.approx(-valuer.accuracy([2]))  # an empty pool routes nothing
    greedy = greedy_pools(valuer, list(range(5)))
    assert [g["size"] for g in greedy] == [1, 2, 3, 4, 5]
    assert all(len(g["models"]) == g["size"] for g in greedy)
    assert all(set(a["models"]) < set(b["models"]) for a, b in zip(greedy, greedy[1:]))
    assert greedy[1]["accuracy"] > greedy[0]["accuracy"]


def test_each_pool_is_routed_with_the_guard_the_service_refits_for_it():
    """A margin that never leaves the default (as fitted on the two all-round models) would keep the
    niche expert from any query; the service refits the margin for pool + expert on the anchors,
    so the valuer routes each pool with that pool's refitted layer and the expert's gain shows."""
    from types import SimpleNamespace

    from icl_router.routing.decision_fit import PoolDecisions, refit_guard

    models, p, prof, sim, anchors = planted_with_anchors()
    router = SimpleNamespace(evidence=AnchorEvidence().eval(), anchor_emb=torch.as_tensor(anchors, dtype=torch.float32))
    stale = DecisionParams(tau=0.1, prior_weight=1.0, min_gain=1.0, fitted={"models": ["pool-b", "pool-a"]})
    pools = PoolDecisions(router, stale, models=models, profiles=prof)
    assert pools([1, 0]) is stale  # the pool it was fitted on keeps the stored layer
    grown = pools([0, 1, 2])
    assert grown is pools([2, 1, 0])  # cached per pool
    ref = refit_guard(router, stale, profiles=prof[[0, 1, 2]])
    assert grown.min_gain == ref.min_gain < stale.min_gain and grown.fitted["guard"] == ref.fitted["guard"]

    gains = {}
    for name, decision_for in (("stored", None), ("refitted", pools)):
        valuer = Valuer(Inputs(models, p, prof, sim, params=stale, decision_for=decision_for), estimator="eb")
        gains[name] = {r["model"]: r for r in candidate_gains(valuer, [0, 1], [2, 3, 4])}
    assert gains["stored"]["niche"]["traffic_share"] == 0.0 and abs(gains["stored"]["niche"]["gain"]) < 1e-9
    assert gains["refitted"]["niche"]["gain"] > 5.0 and gains["refitted"]["niche"]["traffic_share"] > 0.2


def test_evidence_logit_matches_the_evidence_head():
    torch.manual_seed(0)
    head = AnchorEvidence()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([0.3, 1.1, -0.2, 0.4]))
        head.bias.fill_(0.25)
    q, a = torch.randn(7, 12), torch.randn(20, 12)
    prof = torch.rand(3, 20) < 0.5
    sim = cosine(q.numpy(), a.numpy())
    args = (head.weight.detach().numpy(), 0.25, TAUS)
    ref = head(q, a, prof).T.detach().numpy()
    np.testing.assert_allclose(evidence_logit(sim, prof.numpy(), *args), ref, atol=1e-5)
    keep = np.zeros(20, dtype=bool)
    keep[::3] = True
    sub = head(q, a[torch.from_numpy(keep)], prof[:, torch.from_numpy(keep)]).T.detach().numpy()
    np.testing.assert_allclose(evidence_logit(sim, prof.numpy(), *args, keep=keep), sub, atol=1e-5)


def test_bad_estimator_inputs_are_named():
    models, p, prof, sim = planted()
    with pytest.raises(ValuationError, match="estimator 'best' is unknown"):
        Valuer(Inputs(models, p, prof, sim), estimator="best")
    with pytest.raises(ValuationError, match="crossfit.*anchor evidence.*estimator: eb"):
        Valuer(Inputs(models, p, prof, sim), estimator="crossfit")
    with pytest.raises(ValuationError, match="policy 'cost' needs a cost per model"):
        Valuer(Inputs(models, p, prof, sim, policy=Policy(kind="cost", cost_weight=1.0)))
    with pytest.raises(ValuationError, match="inputs disagree"):
        Inputs(models, p[:, :3], prof, sim)
