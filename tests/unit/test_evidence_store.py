"""The evidence store: persisted, bounded, generation-stamped; its kernel joins the router's p (routing/evidence_store.py)."""

import numpy as np
import pyarrow as pa
import pytest

from icl_router.routing import evidence_store as es
from icl_router.routing.decision import DecisionParams
from icl_router.routing.policy import Policy, choose
from icl_router.serving.decision_log import now

pytestmark = pytest.mark.unit


def rows(qids, models, scores, emb, source="reprofile"):
    n = len(qids)
    return pa.table({"query_id": qids, "embedding": [list(map(float, e)) for e in emb], "model_id": models, "score": scores,
                     "source": [source] * n, "time": [now()] * n})


def test_append_load_and_bound(tmp_path):
    assert es.generation(tmp_path) == "" and es.load(tmp_path) is None
    e = np.eye(3, dtype=np.float32)
    m1 = es.append(tmp_path, rows(["q1", "q1", "q2"], ["a", "b", "a"], [1.0, 0.0, 0.5], [e[0], e[0], e[1]]))
    ev = es.load(tmp_path, dim=3)
    assert ev.n == 2 and ev.generation == m1["generation"]
    np.testing.assert_array_equal(ev.matrix(["a", "b", "c"]), [[1.0, 0.5], [0.0, np.nan], [np.nan, np.nan]])
    m2 = es.append(tmp_path, rows(["q3"], ["b"], [1.0], [e[2]]), max_queries=2)  # the oldest query goes
    assert m2["generation"] != m1["generation"] and m2["queries"] == 2
    ev = es.load(tmp_path)
    assert ev.n == 2 and ev.scores["b"].tolist()[-1] == 1.0 and "q1" not in es.read_table(tmp_path).column("query_id").to_pylist()
    with pytest.raises(es.EvidenceStoreError):
        es.load(tmp_path, dim=5)


def test_combine_counts_the_router_p_for_its_mass():
    p, mass = np.array([[0.8, 0.4]]), np.array([2.0])
    sim = np.array([[1.0, 1.0]])  # two store rows, both like the query: weight 1 each
    E, W = es.store_kernel(sim, np.array([[0.0, 0.0], [1.0, 1.0]]), tau=0.1)
    out, m = es.combine(p, mass, E, W)
    np.testing.assert_allclose(out, [[(2 * 0.8 + 0) / 4, (2 * 0.4 + 2) / 4]])
    np.testing.assert_allclose(m, [[4.0, 4.0]])
    far = es.store_kernel(np.array([[-1.0, -1.0]]), np.array([[0.0, 0.0], [1.0, 1.0]]), tau=0.1)
    np.testing.assert_allclose(es.combine(p, mass, *far)[0], p, atol=1e-6)  # unlike every store row: p as it was


def test_partial_outcomes_are_guarded():
    sim = np.array([[1.0, 1.0, 1.0]])
    only_a = np.array([[0.0, 0.0, 0.0], [np.nan, np.nan, np.nan]])  # the routed model failed thrice; the other has no outcome
    E, W = es.store_kernel(sim, only_a, tau=0.1, partial="raw")
    assert W[0, 0] == pytest.approx(3.0) and W[0, 1] == 0
    E, W = es.store_kernel(sim, only_a, tau=0.1, partial="cap")
    assert W[0, 0] == 0 and E[0, 0] == 0  # nobody else evidenced here: the failures do not count against a
    E, W = es.store_kernel(sim, only_a, tau=0.1, partial="discount", discount=0.25)
    assert W[0, 0] == pytest.approx(0.75)
    both = np.array([[0.0, 0.0, np.nan], [np.nan, np.nan, 1.0]])  # b evidenced once here: a's failures count up to that
    E, W = es.store_kernel(sim, both, tau=0.1, partial="cap")
    np.testing.assert_allclose(W, [[1.0, 1.0]])
    np.testing.assert_allclose(E, [[0.0, 1.0]])


def test_choose_takes_a_mass_per_model():
    params = DecisionParams(tau=0.1, prior_weight=1.0, min_gain=0.0)
    prior = {"a": 0.5, "b": 0.5}
    p = {"a": 0.9, "b": 0.8}
    same = choose(p, policy=Policy("highest"), prior=prior, mass=1.0, params=params)
    assert same.model == "a"
    # b's estimate rests on much more evidence, a's is mostly its prior
    d = choose(p, policy=Policy("highest"), prior=prior, mass={"a": 0.01, "b": 100.0}, params=params)
    assert d.model == "b" and d.p["a"] == pytest.approx(0.5 + 0.4 * 0.01 / 1.01)


def test_a_router_reloads_the_store_on_sync_and_routes_on_it(tmp_path):
    import os

    from icl_router.routing.online import OnlineRouter
    from icl_router.testing import make_tiny_router_dir, tiny_profile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = make_tiny_router_dir(tmp_path / "router", k=8, both=True, decision=DecisionParams(tau=0.1, prior_weight=1.0, min_gain=0.0).to_json())
    r = OnlineRouter(d, scoring="evidence")
    pool = {"tiny-a": tiny_profile(8).tolist(), "tiny-b": (np.arange(8) % 2 == 0).tolist()}
    r.sync(pool)
    text = "Who wrote Hamlet?"
    before = r.score([text])
    assert before.model_mass is None
    emb, _ = r.embed([text])
    es.append(d, rows(["q1", "q1"], ["tiny-a", "tiny-b"], [0.0, 1.0], [emb[0], emb[0]]))
    r.sync(pool)  # the same pool: only the store's generation moved
    after = r.score([text])
    a, b = after.models.index("tiny-a"), after.models.index("tiny-b")
    assert after.p[0, b] > 0.9 and after.p[0, a] < 0.1  # the random anchors say nothing; the store row says all
    assert after.model_mass[0, a] == pytest.approx(before.mass[0] + 1.0, rel=1e-3)
    prior = {"tiny-a": float(np.mean(pool["tiny-a"])), "tiny-b": 0.5}
    d2 = choose(dict(zip(after.models, after.p[0].tolist())), policy=Policy("highest"), prior=prior,
                mass=dict(zip(after.models, after.model_mass[0].tolist())), params=r.decision)
    assert d2.model == "tiny-b"
