"""TrainData: the one hand-off from a routing set to training, for the Ray Train job and evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from icl_router.data.dataset import DatasetError
from icl_router.data.routing_set import RoutingSet
from icl_router.data.splits import Split
from icl_router.train.data import TrainData, build_train_data

N, M, E = 40, 3, 8


@pytest.fixture
def rs():
    rng = np.random.default_rng(0)
    ids = [f"q{i:02d}" for i in range(N)]
    labels = (rng.random((N, M)) < 0.5).astype(np.float32)
    labels[5, 1] = np.nan  # an unknown outcome is no training pair
    return RoutingSet(
        models=["a", "b", "c"],
        query_ids=ids,
        texts=[f"text {i}" for i in range(N)],
        tasks=["t"] * N,
        embeddings=rng.standard_normal((N, E)).astype(np.float32),
        labels=labels,
        anchor_ids=ids[:4],
        split=Split(train=ids[:30], test=ids[30:35], ood=ids[35:]),
        embedder="e",
    )


def test_stage2_items_are_the_train_pairs_and_the_rest_the_routing_sets(rs):
    data, val = build_train_data(rs, stage=2)
    assert isinstance(data, TrainData) and len(val) == 0
    np.testing.assert_array_equal(data.items, rs.training_pairs())
    assert data.items.dtype == np.int64 and data.items.shape == (26 * M - 1, 3)  # 26 train queries off the anchors, one NaN
    assert set(data.rows.tolist()) == set(range(4, 30))
    np.testing.assert_allclose(data.anchor_emb, rs.embeddings[:4], atol=1e-7)  # [K, E], anchor order; float rows copied
    np.testing.assert_array_equal(data.profiles, rs.profiles())  # [M, K]
    assert data.profiles.shape == (M, 4) and data.models == rs.models and data.texts is rs.texts


def test_validation_rows_leave_the_items(rs):
    data, val = build_train_data(rs, stage=2, val_fraction=0.25, seed=1)
    assert len(val) == int(0.25 * 26) and not np.isin(data.rows, val).any()
    assert set(val.tolist()) | set(data.rows.tolist()) == set(range(4, 30))
    again, val2 = build_train_data(rs, stage=2, val_fraction=0.25, seed=1)
    np.testing.assert_array_equal(val, val2)  # the seed fixes the slice


def test_a_model_subset_is_renumbered_in_the_given_order(rs):
    full, _ = build_train_data(rs, stage=2)
    data, _ = build_train_data(rs, stage=2, models=[2, 0])
    assert data.models == ["c", "a"] and set(data.items[:, 1].tolist()) == {0, 1}
    np.testing.assert_array_equal(data.profiles, rs.profiles()[[2, 0]])
    for local, orig in ((0, 2), (1, 0)):
        np.testing.assert_array_equal(data.items[data.items[:, 1] == local][:, [0, 2]], full.items[full.items[:, 1] == orig][:, [0, 2]])


def test_stage1_trains_on_the_train_queries_and_the_anchors(rs):
    data, _ = build_train_data(rs, stage=1)
    assert data.items.shape == (30, 3) and (data.items[:, 1:] == -1).all()
    np.testing.assert_array_equal(data.rows, np.arange(30))


def test_no_anchors_or_no_rows_is_a_clear_error(rs):
    rs.anchor_ids = []
    with pytest.raises(DatasetError, match="no anchors"):
        build_train_data(rs, stage=2)
    rs.anchor_ids = rs.query_ids[:4]
    rs.labels[4:] = np.nan  # the anchors keep their outcomes (profiles), no train query has one
    with pytest.raises(DatasetError, match="no usable rows"):
        build_train_data(rs, stage=2)


def test_local_router_paths_reach_the_workers_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in their own directory: the driver hands them absolute local paths."""
    from icl_router.train.driver import _absolute_if_local

    (tmp_path / "runs" / "models" / "lm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _absolute_if_local("runs/models/lm") == str(tmp_path / "runs" / "models" / "lm")
    assert _absolute_if_local("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # a hub id stays
    assert _absolute_if_local(None) is None
