"""The decision layer: shrinkage by evidence, the default guard, calibration, fitting."""

from __future__ import annotations

import numpy as np
import pytest

from icl_router.routing import decision as D

MODELS = ["strong", "mid", "niche"]
PRIOR = np.array([0.8, 0.6, 0.4])  # [T]


def test_a_query_unlike_every_anchor_routes_as_the_prior_says():
    anchors = np.eye(4, 8)  # [K=4, E=8] four orthogonal anchors
    far = np.zeros((1, 8))
    far[0, 7] = 1.0  # orthogonal to every anchor: cosine 0
    near = anchors[:1] + 0.01
    p = np.array([[0.1, 0.2, 0.95]])  # the router likes the niche model
    params = D.DecisionParams(tau=0.05, prior_weight=1.0)
    mass_far = D.evidence_mass(D.cosine(far, anchors), params.tau)
    mass_near = D.evidence_mass(D.cosine(near, anchors), params.tau)
    assert mass_far[0] < 1e-6 < 0.5 < mass_near[0]  # about one anchor says the same as `near`
    far_p = D.adjusted(p, mass_far, PRIOR, params)
    np.testing.assert_allclose(far_p, PRIOR[None], atol=1e-5)  # the evidence's share is ~e^-20
    assert D.guarded_choice(far_p, D.default_index(MODELS, PRIOR, params), 0.0)[0] == 0
    near_p = D.adjusted(p, mass_near, PRIOR, params)
    assert D.guarded_choice(near_p, 0, 0.0)[0] == 2  # close evidence keeps the router's pick


def test_the_guard_never_leaves_the_default_when_min_gain_is_1():
    rng = np.random.default_rng(0)
    p = rng.random((200, 3))
    assert (D.guarded_choice(p, 1, 1.0) == 1).all()
    assert (D.guarded_choice(p, 1, 0.0) == p.argmax(1)).all()  # no margin: the plain argmax
    with_costs = D.guarded_choice(p, 0, 1.0, cost_weight=10.0, costs=np.array([0.0, 0.01, 0.02]))
    assert (with_costs == 0).all()


def test_default_follows_the_priors_or_the_configured_model_and_costs():
    params = D.DecisionParams()
    assert D.default_index(MODELS, PRIOR, params) == 0
    assert D.default_index(MODELS, np.array([0.5, 0.7, 0.1]), params) == 1  # a newly registered best model
    assert D.default_index(MODELS, PRIOR, params.replace(default_model="niche")) == 2
    costs = np.array([1.0, 0.1, 0.0])
    assert D.default_index(MODELS, PRIOR, params, cost_weight=0.5, costs=costs) == 1  # 0.3 < 0.55 > 0.4
    with pytest.raises(D.DecisionError, match="default_model 'gpt-9' is not in the pool"):
        D.default_index(MODELS, PRIOR, params.replace(default_model="gpt-9"))


@pytest.mark.parametrize(
    "field,value",
    [("tau", 0.0), ("tau", -1.0), ("prior_weight", -0.1), ("min_gain", 1.5), ("min_gain", float("nan")), ("min_gain", "high")],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(D.DecisionError, match=f"decision.{field} must be a number"):
        D.DecisionParams(**{field: value})
    if field in D.OVERRIDABLE:
        with pytest.raises(D.DecisionError, match=f"decision.{field}"):
            D.DecisionParams().replace(**{field: value})
    with pytest.raises(D.DecisionError, match="cannot be overridden"):
        D.DecisionParams().replace(tau=0.2)


def test_params_round_trip_through_json():
    params = D.DecisionParams(tau=0.07, prior_weight=0.3, min_gain=0.02, default_model="mid", calibration=(1.3, -0.2), fitted={"rows": 5})
    again = D.DecisionParams.from_json(params.to_json())
    assert again == params and again.fitted == {"rows": 5}
    assert D.DecisionParams.from_json(None) == D.DecisionParams()
    with pytest.raises(D.DecisionError, match="unexpected keyword"):
        D.DecisionParams.from_json({"tau": 0.1, "gamma": 2})


def _pool(seed: int, n: int = 1200, k: int = 150):
    """Queries on 4 topics; 'strong' is right 75% everywhere, 'niche' 95% on topic 0 and 30% elsewhere."""
    centres = np.random.default_rng(99).normal(size=(4, 16))  # the same topics for every seed
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 4, n + k)
    emb = centres[topic] + 0.3 * rng.normal(size=(n + k, 16))
    rate = np.where(topic[:, None] == 0, [0.75, 0.5, 0.95], [0.75, 0.5, 0.30])  # [N, T]
    labels = (rng.random(rate.shape) < rate).astype(float)
    return emb[:k], labels[:k] >= 0.5, emb[k:], labels[k:], topic[k:]


def _rate(sim, profiles, tau=0.1):
    w = np.exp(np.where(np.isnan(sim), -np.inf, sim / tau))
    return np.clip((w / w.sum(1, keepdims=True)) @ profiles, 0.02, 0.98)


def test_fit_finds_a_guard_that_beats_argmax_and_never_loses_to_the_default():
    anchors, profiles, emb, labels, topic = _pool(0)
    prior = profiles.mean(0)
    sim = D.cosine(emb, anchors)
    params = D.fit_decision([D.View(_rate(sim, profiles), sim)], labels, prior)
    assert params.fitted["rows"] == len(labels)
    anchors2, profiles2, emb2, labels2, topic2 = _pool(1)  # fresh queries on the same kind of pool
    sim2 = D.cosine(emb2, anchors)
    p = D.adjusted(_rate(sim2, profiles), D.evidence_mass(sim2, params.tau), prior, params)
    choice = D.guarded_choice(p, D.default_index(MODELS, prior, params), params.min_gain)
    best_single = 100 * labels2[:, 0].mean()
    assert D.routed_accuracy(choice, labels2) > best_single + 3  # topic 0 goes to the niche model
    assert (choice[topic2 == 0] == 2).mean() > 0.8 and (choice[topic2 != 0] == 0).mean() > 0.8


def test_fit_with_a_hidden_cluster_view_stays_with_the_default_off_the_anchors():
    anchors, profiles, emb, labels, topic = _pool(2)
    prior = profiles.mean(0)
    sim = D.cosine(emb, anchors)
    groups = D.cluster_groups(np.concatenate([anchors, emb]), n_clusters=4, seed=0)
    hidden = D.hide_own_cluster(sim, groups[len(anchors) :], groups[: len(anchors)])
    assert np.isnan(hidden).any() and not np.isnan(hidden).all(1).any()
    params = D.fit_decision([D.View(_rate(sim, profiles), sim), D.View(_rate(hidden, profiles), hidden)], labels, prior)
    # a query from a topic no anchor covers (all anchors of its topic hidden) keeps the default
    p = D.adjusted(_rate(hidden, profiles), D.evidence_mass(hidden, params.tau), prior, params)
    choice = D.guarded_choice(p, D.default_index(MODELS, prior, params), params.min_gain)
    assert D.routed_accuracy(choice, labels) >= 100 * np.nanmean(labels[:, 0]) - 1.0


def test_platt_keeps_the_order_and_improves_the_level():
    rng = np.random.default_rng(3)
    p_true = rng.uniform(0.05, 0.95, (2000, 2))
    labels = (rng.random(p_true.shape) < p_true).astype(float)
    squashed = 0.5 + 0.2 * (p_true - 0.5)  # the right order, too timid a level
    a, b = D.fit_platt(squashed, labels)
    assert a > 1
    cal = D.calibrate(squashed, (a, b))
    assert (np.argsort(cal[:, 0]) == np.argsort(squashed[:, 0])).all()
    brier = lambda p: float(np.mean((p - labels) ** 2))  # noqa: E731
    assert brier(cal) < brier(squashed) - 0.01


def test_a_registered_model_gets_the_guard_refitted_on_the_anchors():
    """A margin fitted on a pool where leaving the default never paid keeps a registered niche
    model out; refitted on the anchors (every registered model has outcomes there) it lets the
    niche model take its topic, with the shrinkage and calibration as they were fitted."""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from icl_router.model.evidence import AnchorEvidence
    from icl_router.routing.decision_fit import refit_guard

    anchors, profiles, emb, labels, _ = _pool(0)  # profiles [K, T]
    router = SimpleNamespace(evidence=AnchorEvidence().eval(), anchor_emb=torch.as_tensor(anchors, dtype=torch.float32))

    def p_of(q):  # the evidence head's p [Q, T]
        with torch.no_grad():
            return torch.sigmoid(router.evidence(torch.as_tensor(q, dtype=torch.float32), router.anchor_emb, torch.as_tensor(profiles.T))).T.double().numpy()

    prior = profiles.mean(0)
    sim = D.cosine(emb, anchors)
    fitted = D.fit_decision([D.View(p_of(emb), sim)], labels, prior)
    stale = replace(fitted, min_gain=0.2, fitted={"models": ["strong", "mid"]})  # as fitted without the niche model

    refit = refit_guard(router, stale, profiles=profiles.T)
    assert (refit.tau, refit.prior_weight, refit.calibration) == (stale.tau, stale.prior_weight, stale.calibration)
    assert refit.min_gain < stale.min_gain and refit.fitted["guard"]["on"] == "anchors"

    _, _, emb2, labels2, topic2 = _pool(1)  # fresh queries
    p = D.adjusted(p_of(emb2), D.evidence_mass(D.cosine(emb2, anchors), refit.tau), prior, refit)

    def routed(params):
        return D.guarded_choice(p, D.default_index(MODELS, prior, params), params.min_gain)

    assert D.routed_accuracy(routed(refit), labels2) > D.routed_accuracy(routed(stale), labels2) + 3
    assert (routed(refit)[topic2 == 0] == 2).mean() > 0.8


def _task_pool(seed: int, n: int = 1200, k: int = 150):
    """``_pool`` with the topics' embeddings overlapping: the nearest anchors say little, the topic (the task) says much."""
    centres = np.random.default_rng(99).normal(size=(4, 16))
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 4, n + k)
    emb = centres[topic] + 2.0 * rng.normal(size=(n + k, 16))
    rate = np.where(topic[:, None] == 0, [0.75, 0.5, 0.95], [0.75, 0.5, 0.30])  # [N, T]
    labels = (rng.random(rate.shape) < rate).astype(float)
    tasks = np.array([f"topic-{t}" for t in topic], dtype=object)
    return emb[:k], labels[:k] >= 0.5, tasks[:k], emb[k:], labels[k:], tasks[k:]


def test_the_same_task_rate_reads_only_that_tasks_visible_anchors():
    sim = np.array([[0.9, 0.1, np.nan, 0.5], [0.2, 0.3, 0.4, 0.5]])  # [Q=2, K=4]; anchor 2 hidden from query 0
    profiles = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=bool)  # [T=2, K]
    rate, has = D.task_kernel(sim, profiles, query_tasks=np.array(["b", None], dtype=object), anchor_tasks=["a", "b", "b", "a"], tau=0.1)
    assert has.tolist() == [True, False]  # query 1 names no task
    np.testing.assert_allclose(rate[0], [D.CLIP, 1 - D.CLIP])  # only anchor 1 is a visible 'b': model 1 right, model 0 wrong
    _, has = D.task_kernel(sim, profiles, query_tasks=["c", "a"], anchor_tasks=["a", "b", "b", "a"], tau=0.1)
    assert has.tolist() == [False, True]  # no anchor has task 'c'


def test_queries_naming_a_task_the_anchors_have_get_the_task_layer_and_the_rest_the_plain_one():
    from icl_router.routing.policy import Policy, route_batch

    sim = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])  # [Q=3, K=2]
    profiles = np.array([[0, 0], [1, 1]], dtype=bool)  # model 1 right on every anchor
    task = D.DecisionParams(tau=0.05, min_gain=0.0, task_weight=1.0, task_tau=0.1)
    params = D.DecisionParams(tau=0.1, min_gain=1.0, default_model="m0", task=task)  # the plain layer never leaves m0
    p = np.full((3, 2), 0.5)
    li = D.layer_input(p, sim, params=params, profiles=profiles, query_tasks=["x", None, "unknown"], anchor_tasks=["x", "x"])
    assert li.task_rows.tolist() == [True, False, False]
    np.testing.assert_allclose(li.p[0], [D.CLIP, 1 - D.CLIP])  # all weight on the same-task rate
    np.testing.assert_allclose(li.p[1:], p[1:])
    np.testing.assert_allclose(li.mass, [D.evidence_mass(sim, 0.05)[0], *D.evidence_mass(sim, 0.1)[1:]])
    pick, _, default = route_batch(li.p, policy=Policy(), models=["m0", "m1"], prior=np.array([0.0, 1.0]), mass=li.mass, params=params, task_rows=li.task_rows)
    assert pick.tolist() == [1, 0, 0] and default == 0
    plain = D.layer_input(p, sim, params=params, profiles=profiles, query_tasks=None, anchor_tasks=["x", "x"])
    assert not plain.task_rows.any()


def test_fit_task_layer_reads_the_task_where_the_embedding_says_little():
    anchors, profiles, a_tasks, emb, labels, tasks = _task_pool(0)
    prior = profiles.mean(0)
    sim = D.cosine(emb, anchors)
    views = [D.View(_rate(sim, profiles), sim)]
    plain = D.fit_decision(views, labels, prior)
    task = D.fit_task_layer(views, labels, prior, profiles=profiles.T, query_tasks=tasks, anchor_tasks=a_tasks)
    assert task is not None and task.task_weight > 0 and task.task is None and task.fitted["rows"] == len(labels)
    assert D.fit_task_layer(views, labels, prior, profiles=profiles.T, query_tasks=[None] * len(labels), anchor_tasks=a_tasks) is None
    params = D.DecisionParams.from_json({**plain.to_json(), "task": task.to_json()})
    assert params.task == task

    from icl_router.routing.policy import Policy, route_batch

    _, _, _, emb2, labels2, tasks2 = _task_pool(1)  # fresh queries
    sim2 = D.cosine(emb2, anchors)
    acc = {}
    for named in (True, False):
        li = D.layer_input(_rate(sim2, profiles), sim2, params=params, profiles=profiles.T, query_tasks=tasks2 if named else None, anchor_tasks=a_tasks)
        pick, _, _ = route_batch(li.p, policy=Policy(), models=MODELS, prior=prior, mass=li.mass, params=params, task_rows=li.task_rows)
        acc[named] = D.routed_accuracy(pick, labels2)
    assert acc[True] > acc[False] + 3 and acc[True] > 100 * labels2[:, 0].mean() + 3  # topic 0 goes to the niche model


def test_the_task_layer_round_trips_and_takes_the_same_overrides():
    task = D.DecisionParams(tau=0.05, prior_weight=0.1, min_gain=0.01, task_weight=0.6, task_tau=0.15, fitted={"rows": 3})
    params = D.DecisionParams(tau=0.1, prior_weight=1.0, min_gain=0.03, task=task)
    again = D.DecisionParams.from_json(params.to_json())
    assert again == params and again.task.fitted == {"rows": 3} and again.for_task(True) == task and again.for_task(False) == again
    over = params.replace(min_gain=0.2, default_model="mid")
    assert (over.min_gain, over.task.min_gain, over.task.default_model, over.task.task_weight) == (0.2, 0.2, "mid", 0.6)
    with pytest.raises(D.DecisionError, match="decision.task must be a decision layer without a task layer"):
        D.DecisionParams(task=params)
    with pytest.raises(D.DecisionError, match="decision.task_weight must be a number >= 0.0 and <= 1.0"):
        D.DecisionParams.from_json({"task": {"task_weight": 2.0}})


def _misleading_anchors(seed: int = 0, n: int = 600):
    """Held-out queries where 'mid' is right 80% and 'strong' 50%, while the anchors (and the router's p,
    slightly) favour 'strong': the anchors' best is not the best model."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 3)) < np.array([0.5, 0.8, 0.3])).astype(float)
    p = np.clip(np.array([0.62, 0.58, 0.3]) + 0.02 * rng.normal(size=(n, 3)), 0.01, 0.99)
    sim = rng.uniform(-0.2, 0.2, (n, 20))  # [V, K]: no anchor says much about any query
    profiles = np.zeros((3, 20), dtype=bool)
    profiles[0, :16], profiles[1, :8], profiles[2, :4] = True, True, True  # anchor accuracy 0.8 / 0.4 / 0.2
    return [D.View(p, sim)], labels, profiles


def test_the_fitted_default_comes_from_the_held_out_queries_not_the_anchors():
    from icl_router.routing.decision_fit import fit_on_views

    views, labels, profiles = _misleading_anchors()
    prior = profiles.mean(1)
    assert D.held_out_default(labels) == 1 and int(np.argmax(prior)) == 0  # they disagree
    tasks = ["t"] * len(labels)
    anchor_tasks = ["t"] * profiles.shape[1]
    old = fit_on_views(views, labels=labels, profiles=profiles, models=MODELS, query_tasks=tasks, anchor_tasks=anchor_tasks)
    new = fit_on_views(views, labels=labels, profiles=profiles, models=MODELS, query_tasks=tasks, anchor_tasks=anchor_tasks, default="held_out")
    assert old.default_model is None and D.default_index(MODELS, prior, old) == 0
    assert new.default_model == new.task.default_model == "mid" and D.fitted_default(new) and D.fitted_default(new.task)
    assert D.default_index(MODELS, prior, new) == D.default_index(MODELS, prior, new.task) == 1
    assert new.fitted["models"] == MODELS
    # the margin is picked for that default: leaving 'mid' for 'strong' on its slightly higher p loses, so the guard holds
    q = D.adjusted(views[0].p, D.evidence_mass(views[0].sim, new.tau), prior, new)
    routed = D.routed_accuracy(D.guarded_choice(q, 1, new.min_gain), labels)
    assert routed == pytest.approx(100 * labels[:, 1].mean()) and new.fitted["accuracy"] == pytest.approx(routed, abs=1e-3)
    assert old.fitted["accuracy"] < routed - 20  # the anchors' default routes at 'strong's 50%
    again = D.DecisionParams.from_json(new.to_json())  # stored in the router directory and read back: still the fitted one
    assert D.fitted_default(again) and D.fitted_default(again.task)


def test_a_fitted_default_missing_from_the_pool_or_priced_falls_back_to_the_best_prior():
    fitted = D.with_default(D.DecisionParams(min_gain=0.1, task=D.DecisionParams()), "mid")
    assert D.default_index(MODELS, PRIOR, fitted) == 1
    assert D.default_index(["strong", "niche"], PRIOR[[0, 2]], fitted) == 0  # no error: the best prior of this pool
    assert D.default_index(MODELS, PRIOR, fitted, cost_weight=0.5, costs=np.array([1.0, 0.1, 0.0])) == 1  # utility: 0.3, 0.55, 0.4
    assert D.default_index(MODELS, PRIOR, fitted, cost_weight=0.5, costs=np.array([0.0, 0.5, 0.0])) == 0  # not 'mid' for being fitted
    configured = fitted.replace(default_model="niche")  # a request's own default is no fitted one: it must be in the pool
    assert not D.fitted_default(configured) and D.default_index(MODELS, PRIOR, configured) == 2
    with pytest.raises(D.DecisionError, match="is not in the pool"):
        D.default_index(["strong", "mid"], PRIOR[:2], configured)
    assert D.with_default(fitted, None).default_model is None and "default" not in D.with_default(fitted, None).task.fitted


def test_the_guard_refitted_for_another_pool_keeps_the_fitted_default_only_if_the_pool_has_it():
    from types import SimpleNamespace

    import torch

    from icl_router.model.evidence import AnchorEvidence
    from icl_router.routing.decision_fit import PoolDecisions, refit_guard

    anchors, profiles, _, _, _ = _pool(0)  # profiles [K, T]: 'strong' is the anchors' best
    router = SimpleNamespace(evidence=AnchorEvidence().eval(), anchor_emb=torch.as_tensor(anchors, dtype=torch.float32))
    stored = D.with_default(D.DecisionParams(tau=0.1, prior_weight=1.0, min_gain=0.2, fitted={"models": ["strong", "mid"]}), "mid")
    kept = refit_guard(router, stored, profiles=profiles.T, models=MODELS)  # 'niche' registered
    assert kept.default_model == "mid" and D.fitted_default(kept) and kept.fitted["guard"]["on"] == "anchors"
    dropped = refit_guard(router, stored, profiles=profiles.T[[0, 2]], models=["strong", "niche"])  # 'mid' removed
    assert dropped.default_model is None and not D.fitted_default(dropped) and dropped.fitted["guard"]["models"] == 2
    assert D.default_index(["strong", "niche"], profiles.T[[0, 2]].mean(1), dropped) == 0
    unnamed = refit_guard(router, stored, profiles=profiles.T)  # a caller that does not name the pool: nothing to keep it by
    assert unnamed.default_model is None
    pools = PoolDecisions(router, stored, models=MODELS, profiles=profiles.T)  # what the value job and bench value route each pool with
    assert pools([0, 1, 2]).default_model == "mid" and pools([0, 2]).default_model is None
