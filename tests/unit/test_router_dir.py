"""The trained router directory: a round trip, and each missing or mismatched part refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from icl_router import schemas as S
from icl_router.data.dataset import Dataset
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.model.router_dir import (
    ANCHORS_FILE,
    RouterDirError,
    RouterMeta,
    anchor_queries,
    load_router_dir,
    read_anchor_queries,
    save_router_dir,
    write_anchor_queries,
    write_profiles,
)
from icl_router.routing.scorer import Scorer

K, E = 5, 12


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_router_lm):
    lm, tok = tiny_router_lm  # read-only: the router only scores and is saved
    layout = PromptLayout(tok, query_input="vector", profile_layout="pairs")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(K, E)).eval()
    anchors = [f"a{i}" for i in range(K)]
    meta = RouterMeta("emb", E, "vector", "pairs", layout.placeholder_id, layout.yes_id, layout.no_id, anchors, extra={"steps": 7})
    pool = {"m1": np.array([1, 0, 1, 0, 1], bool), "m0": np.array([0, 0, 1, 1, 1], bool)}
    path = save_router_dir(router, tmp_path_factory.mktemp("r") / "router", meta=meta, pool=pool)
    return router, pool, path


def copy(saved, tmp_path):
    return shutil.copytree(saved[2], tmp_path / "router")


def test_round_trip_scores_the_same(saved):
    router, pool, path = saved
    loaded = load_router_dir(path)
    assert list(loaded.pool) == ["m1", "m0"] and loaded.meta.extra == {"steps": 7}
    np.testing.assert_array_equal(loaded.pool["m1"], pool["m1"])
    q = torch.randn(2, E)
    want = Scorer(router, pool).score(["x", "y"], query_emb=q)
    got = Scorer(loaded.router, loaded.pool).score(["x", "y"], query_emb=q)
    assert np.abs(want - got).max() < 1e-6  # float32 weights saved and loaded; the forward may order sums differently


def test_missing_file(saved, tmp_path):
    path = copy(saved, tmp_path)
    (path / "projector.safetensors").unlink()
    with pytest.raises(RouterDirError, match="projector.safetensors is missing"):
        load_router_dir(path)
    (path / "icl_router.json").unlink()
    with pytest.raises(RouterDirError, match="not a router directory: icl_router.json is missing"):
        load_router_dir(path)


def test_token_ids_that_do_not_match_the_tokenizer(saved, tmp_path):
    path = copy(saved, tmp_path)
    meta = json.loads((path / "icl_router.json").read_text())
    meta["yes_id"] += 1
    (path / "icl_router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterDirError, match="tokenizer gives placeholder/Yes/No ids"):
        load_router_dir(path)


def test_anchor_vectors_of_the_wrong_shape_and_a_foreign_projector(saved, tmp_path):
    path = copy(saved, tmp_path)
    tensors = load_file(path / "projector.safetensors")
    save_file({**tensors, "anchor_emb": torch.zeros(K + 1, E)}, path / "projector.safetensors")
    with pytest.raises(RouterDirError, match=r"anchor_emb is \(6, 12\), icl_router.json says K=5 anchors of width 12"):
        load_router_dir(path)
    save_file({**tensors, "projector.inp.weight": torch.zeros(3, E)}, path / "projector.safetensors")
    with pytest.raises(RouterDirError, match="does not fit this router LM"):
        load_router_dir(path)


def test_profile_lacking_anchors_and_an_unknown_format(saved, tmp_path):
    path = copy(saved, tmp_path)
    anchors = json.loads((path / "icl_router.json").read_text())["anchor_query_ids"]
    write_profiles(path / "profiles.parquet", {"m1": np.ones(K, bool)}, anchors)
    import pyarrow.parquet as pq

    table = pq.read_table(path / "profiles.parquet")
    pq.write_table(table.slice(0, K - 2), path / "profiles.parquet")
    with pytest.raises(RouterDirError, match="model 'm1' lacks 2 anchors"):
        load_router_dir(path)
    meta = json.loads((path / "icl_router.json").read_text())
    (path / "icl_router.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(RouterDirError, match="format_version 99"):
        load_router_dir(path)


def test_decision_parameters_round_trip_and_a_bad_block_is_refused(saved, tmp_path):
    from icl_router.model.router_dir import read_meta, write_decision
    from icl_router.routing.decision import DecisionError, DecisionParams

    path = copy(saved, tmp_path)
    assert read_meta(path).decision is None  # older directories: no decision layer
    params = DecisionParams(tau=0.05, prior_weight=0.3, min_gain=0.02, calibration=(1.2, -0.1), fitted={"rows": 40})
    write_decision(path, params.to_json())
    assert DecisionParams.from_json(read_meta(path).decision) == params
    assert load_router_dir(path).meta.decision == params.to_json()
    meta = json.loads((path / "icl_router.json").read_text())
    (path / "icl_router.json").write_text(json.dumps({**meta, "decision": [0.1]}))
    with pytest.raises(RouterDirError, match="decision must be an object"):
        read_meta(path)
    with pytest.raises(DecisionError, match="decision.min_gain must be a number"):
        DecisionParams.from_json({**params.to_json(), "min_gain": 2})


def test_embedder_variant_is_recorded(saved, tmp_path):
    """A name given as <model>@<variant> is stored as two fields; directories from before variants read as sentence-transformers."""
    router = saved[0]
    layout = router.layout
    anchors = [f"a{i}" for i in range(K)]
    meta = RouterMeta("emb@onnx-int8", E, "vector", "pairs", layout.placeholder_id, layout.yes_id, layout.no_id, anchors)
    path = save_router_dir(router, tmp_path / "r8", meta=meta, pool={"m1": saved[1]["m1"]})
    raw = json.loads((path / "icl_router.json").read_text())
    assert (raw["embedder"], raw["embedder_variant"]) == ("emb", "onnx-int8")
    assert load_router_dir(path).meta.embedder_name == "emb@onnx-int8"
    old = copy(saved, tmp_path)
    raw = json.loads((old / "icl_router.json").read_text())
    del raw["embedder_variant"]
    (old / "icl_router.json").write_text(json.dumps(raw))
    assert load_router_dir(old).meta.embedder_name == "emb"
    raw["embedder_variant"] = "fp4"
    (old / "icl_router.json").write_text(json.dumps(raw))
    with pytest.raises(RouterDirError, match="embedder_variant 'fp4' is unknown"):
        load_router_dir(old)


def test_query_embedder_of_another_variant_is_refused(saved, tmp_path):
    """A router whose anchors came from one variant never gets query vectors from a variant that gives others."""
    from icl_router.data.embedder import EmbedderError, check_embedder

    meta = load_router_dir(saved[2]).meta
    check_embedder(meta.embedder_name, "emb@onnx", where="r")  # same vectors as the reference
    with pytest.raises(EmbedderError, match=r"anchors were embedded with 'emb' \(sentence-transformers\) but the queries would be embedded with 'emb@static'"):
        check_embedder(meta.embedder_name, "emb@static", where=f"router {saved[2]}")


def test_anchor_queries_with_gold_and_grader_in_anchor_order(saved, tmp_path):
    """anchors.parquet: the anchors' rows of the dataset (gold, grader), in anchor order; an older directory
    without it loads; one that names other anchors or another order is refused at load, with the fix."""
    path = copy(saved, tmp_path)
    assert read_anchor_queries(path) is None and load_router_dir(path).pool  # written before the file existed
    ds = Dataset(tmp_path / "ds")
    ids = [f"a{i}" for i in reversed(range(K + 2))]  # the dataset's order is not the anchors'
    ds.write_queries(pa.table({
        S.QUERY_ID: ids, S.TEXT: [f"text of {q}" for q in ids], S.TASK: ["t"] * len(ids), S.SPLIT: ["train"] * len(ids),
        S.GOLD: [f"gold of {q}" for q in ids], S.GRADER: ["exact_match"] * len(ids),
    }))
    anchors = [f"a{i}" for i in range(K)]
    write_anchor_queries(path, anchor_queries(ds.root, anchors))
    got = read_anchor_queries(path)
    assert got.column(S.QUERY_ID).to_pylist() == anchors and got.column(S.POSITION).to_pylist() == list(range(K))
    assert got.column(S.GOLD).to_pylist() == [f"gold of {q}" for q in anchors] and set(got.column(S.GRADER).to_pylist()) == {"exact_match"}
    load_router_dir(path)
    with pytest.raises(RouterDirError, match="not queries of"):
        anchor_queries(ds.root, [*anchors, "elsewhere"])
    with pytest.raises(RouterDirError, match="differ"):
        write_anchor_queries(path, got.slice(1))  # K-1 rows
    swapped = got.take(pa.array([1, 0, *range(2, K)])).set_column(1, S.POSITION, pa.array(range(K), pa.int32()))
    pq.write_table(swapped, path / ANCHORS_FILE)  # written by hand, around the check
    with pytest.raises(RouterDirError, match="first difference at position 0.*router-anchors"):
        load_router_dir(path)
