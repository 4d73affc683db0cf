"""Embedder variants (data/embedder.py): names, which may share anchors, and the derived forms' vectors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from icl_router.data.embedder import (
    BUNDLED,
    EmbedderError,
    EmbedderName,
    check_embedder,
    load_embedder,
    load_query_embedder,
    parse_embedder,
)

TEXTS = ["What is the sum of 17 and 25?", "  Who wrote Hamlet?  ", "word " * 400, "Translate 'good morning' into French."]


def test_names():
    assert parse_embedder(BUNDLED) == EmbedderName(BUNDLED, "sentence-transformers")
    assert parse_embedder(f"{BUNDLED}@onnx-int8") == EmbedderName(BUNDLED, "onnx-int8")
    assert parse_embedder("/models/me@work/minilm") == EmbedderName("/models/me@work/minilm", "sentence-transformers")  # '@' in a path
    assert str(parse_embedder(f"{BUNDLED}@static")) == f"{BUNDLED}@static" and str(parse_embedder(BUNDLED)) == BUNDLED
    with pytest.raises(EmbedderError, match="unknown variant 'fp16'"):
        parse_embedder(f"{BUNDLED}@fp16")
    with pytest.raises(EmbedderError, match="no model before"):
        parse_embedder("@onnx")


def test_only_same_vectors_may_share_anchors(tmp_path):
    check_embedder(BUNDLED, BUNDLED, where="r")
    check_embedder(BUNDLED, f"{BUNDLED}@onnx", where="r")  # the float32 export gives the reference's vectors
    check_embedder(f"{BUNDLED}@onnx", BUNDLED, where="r")
    check_embedder(f"{BUNDLED}@onnx-int8", f"{BUNDLED}@onnx-int8", where="r")
    check_embedder(BUNDLED, str(tmp_path), where="r")  # a local path names the model on a cluster without the hub
    for recorded, used in [(BUNDLED, f"{BUNDLED}@onnx-int8"), (BUNDLED, f"{BUNDLED}@static"), (f"{BUNDLED}@static", f"{BUNDLED}@onnx"),
                           (f"{BUNDLED}@onnx-int8", BUNDLED), (BUNDLED, "other-model"), (BUNDLED, f"{tmp_path}@onnx-int8")]:
        with pytest.raises(EmbedderError, match=f"router r: its anchors were embedded with '{recorded}'"):
            check_embedder(recorded, used, where="router r")
    with pytest.raises(EmbedderError, match="onnx-int8"):
        load_query_embedder(BUNDLED, f"{BUNDLED}@onnx-int8", where="router r")  # refused before anything loads


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    old = os.environ.get("ICL_ROUTER_CACHE")
    os.environ["ICL_ROUTER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield os.environ["ICL_ROUTER_CACHE"]
    if old is None:
        del os.environ["ICL_ROUTER_CACHE"]
    else:
        os.environ["ICL_ROUTER_CACHE"] = old


@pytest.fixture(scope="module")
def reference(cache_dir):
    return load_embedder(BUNDLED).encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)  # [4, 384]


def test_onnx_gives_the_reference_vectors(cache_dir, reference):
    """Exported from the packaged weights offline; float32 graph vs torch: only rounding apart."""
    emb = load_embedder(f"{BUNDLED}@onnx")
    got = emb.encode(TEXTS, batch_size=3)  # unsorted lengths, two batches, one text past max_seq_length
    assert got.dtype == np.float32 and got.shape == reference.shape
    assert np.abs(got - reference).max() < 1e-4  # float32 kernels differ in summation order only
    assert (got * reference).sum(1).min() > 0.99999
    again = load_embedder(f"{BUNDLED}@onnx")  # built once: the second load reads the cache
    np.testing.assert_allclose(again.encode(TEXTS[:1]), got[:1], atol=1e-6)
    assert len([p for p in os.listdir(os.path.join(cache_dir, "embedders")) if not p.startswith(".")]) == 1


@pytest.mark.slow
def test_int8_and_static_give_other_vectors(cache_dir, reference):
    """Their vectors move (so a router records which one embedded its anchors), int8 only a little."""
    int8 = load_embedder(f"{BUNDLED}@onnx-int8").encode(TEXTS)
    cos = (int8 * reference).sum(1)
    assert cos.min() > 0.95 and np.abs(int8 - reference).max() > 1e-3
    static = load_embedder(f"{BUNDLED}@static").encode(TEXTS)
    assert static.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(static, axis=1), 1.0, atol=1e-5)
