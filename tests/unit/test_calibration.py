"""Calibration figures and the tuned neighbour baseline."""

from __future__ import annotations

import numpy as np
import pytest

from icl_router.evaluation import baselines as B
from icl_router.evaluation import calibration as C
from icl_router.routing.decision import routed_accuracy


def test_ece_and_brier_of_a_calibrated_and_an_overconfident_p():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (4000, 3))
    labels = (rng.random(p.shape) < p).astype(float)
    labels[:10, 0] = np.nan  # unknown outcomes are left out
    over = np.where(p > 0.5, 0.99, 0.01)
    assert C.ece(p, labels) < 0.03 < 0.2 < C.ece(over, labels)  # sampling noise of 12k pairs in 10 bins is ~0.01
    assert C.brier(p, labels) < C.brier(over, labels)
    rel = C.reliability(p, labels)
    assert sum(r["n"] for r in rel) == p.size - 10 and all(abs(r["mean_p"] - r["frac_correct"]) < 0.05 for r in rel)
    s = C.summary(p, labels, choice=p.argmax(1), default=0)
    assert s["away_from_default"] == pytest.approx(100 * np.mean(p.argmax(1) != 0))


def test_knn_tuned_routes_a_niche_and_keeps_the_best_model_elsewhere():
    rng = np.random.default_rng(1)
    topic = rng.integers(0, 2, 1500)
    emb = np.eye(8)[topic] + 0.2 * rng.normal(size=(1500, 8))
    rate = np.where(topic[:, None] == 0, [0.8, 0.95, 0.5], [0.8, 0.2, 0.5])  # model 1 is a niche expert
    labels = (rng.random(rate.shape) < rate).astype(float)
    tr, te = slice(0, 1000), slice(1000, None)
    scores, params = B.knn_tuned(emb[tr], labels[tr], emb[te], seed=0)
    assert set(params) == {"k", "m", "delta", "val_acc"} and set(np.unique(scores)) == {0.0, 1.0}
    chosen = scores.argmax(1)
    assert (chosen[topic[te] == 0] == 1).mean() > 0.9 and (chosen[topic[te] == 1] == 0).mean() > 0.9
    assert routed_accuracy(scores.argmax(axis=1), labels[te]) > routed_accuracy(B.best_single(labels[tr], 500).argmax(axis=1), labels[te]) + 3


def test_knn_tuned_reading_the_task_finds_an_expert_the_embedding_hides():
    rng = np.random.default_rng(2)
    topic = rng.integers(0, 2, 1500)
    emb = rng.normal(size=(1500, 8))  # the embedding says nothing of the topic
    rate = np.where(topic[:, None] == 0, [0.6, 0.95], [0.8, 0.2])  # model 1 is the expert of topic 0
    labels = (rng.random(rate.shape) < rate).astype(float)
    tasks = [f"t{t}" for t in topic]
    tr, te = slice(0, 1000), slice(1000, None)
    plain, _ = B.knn_tuned(emb[tr], labels[tr], emb[te], seed=0)
    named, _ = B.knn_tuned(emb[tr], labels[tr], emb[te], tasks=(tasks[tr], tasks[te]), seed=0)
    assert routed_accuracy(named.argmax(axis=1), labels[te]) > routed_accuracy(plain.argmax(axis=1), labels[te]) + 5
    unseen, _ = B.knn_tuned(emb[tr], labels[tr], emb[te], tasks=(tasks[tr], ["new"] * 500), seed=0)  # a task train has not
    assert (unseen.argmax(1) == 0).mean() > 0.9  # the train accuracy: the best single model


def test_quality_at_cost_and_cost_to_reach_on_the_hull():
    from icl_router.evaluation.cost import cost_to_reach, quality_at_cost, utility_curve

    pts = np.array([[1.0, 60.0], [2.0, 80.0], [4.0, 85.0], [3.0, 70.0]])  # (3, 70) lies under the hull
    assert quality_at_cost(pts, 1.5) == pytest.approx(70.0)
    assert quality_at_cost(pts, 3.0) == pytest.approx(82.5)
    assert np.isnan(quality_at_cost(pts, 0.5))  # cheaper than any point
    assert cost_to_reach(pts, 80.0) == pytest.approx(2.0) and cost_to_reach(pts, 82.5) == pytest.approx(3.0)
    assert cost_to_reach(pts, 90.0) is None
    p = np.array([[0.9, 0.8], [0.2, 0.7]])
    labels, costs = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0, 1.0], [10.0, 1.0]])
    curve = utility_curve(p, labels, costs, est_costs=np.array([10.0, 1.0]), cost_weights=[0.0, 1.0])
    assert [c["quality"] for c in curve] == pytest.approx([100.0, 50.0]) and [c["cost"] for c in curve] == pytest.approx([5.5, 1.0])
