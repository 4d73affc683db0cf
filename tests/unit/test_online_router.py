"""The router as a library (routing/online.py): both scoring paths, the pool sync, the embedding cache, the variant check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_router.data.embedder import BUNDLED, EmbedderError
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.model.router_dir import RouterMeta, save_router_dir
from icl_router.routing.online import OnlineRouter

K, E = 12, 384


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory, tiny_router_lm):
    lm, tok = tiny_router_lm  # read-only: the router is saved and loaded from its directory
    layout = PromptLayout(tok, query_input="vector", profile_layout="pairs")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.nn.functional.normalize(torch.randn(K, E), dim=-1), anchor_evidence=True).eval()
    with torch.no_grad():
        router.evidence.lm_weight.fill_(1.0)  # a trained router whose LM speaks (a fresh one starts silent)
    meta = RouterMeta(BUNDLED, E, "vector", "pairs", layout.placeholder_id, layout.yes_id, layout.no_id, [f"a{i}" for i in range(K)], anchor_evidence=True)
    pool = {"m0": np.arange(K) % 2 == 0, "m1": np.arange(K) % 3 == 0}
    return save_router_dir(router, tmp_path_factory.mktemp("r") / "router", meta=meta, pool=pool)


@pytest.fixture(scope="module")
def routers(router_dir):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {s: OnlineRouter(router_dir, scoring=s) for s in ("full", "evidence")}  # the LM speaks: the paths differ


def test_both_paths_score_the_pool(routers):
    routable = {"m0": [i % 2 == 0 for i in range(K)], "m1": [i % 3 == 0 for i in range(K)]}
    out = {}
    for s, r in routers.items():
        assert r.score(["x"])[0] == []  # an empty pool scores nothing
        r.sync(routable)
        models, p, mass, ms, *_ = r.score(["Who wrote Hamlet?", "What is 2 + 2?", "Who wrote Hamlet?"])
        assert models == ["m0", "m1"] and p.shape == (3, 2) and ms["cached"] == 1  # the repeated text is embedded once
        assert mass is None  # no decision layer in this directory
        assert np.abs(p[0] - p[2]).max() < 1e-6 and ((p > 0) & (p < 1)).all()
        out[s] = p
        r.sync({"m1": routable["m1"]})
        assert r.models == ["m1"] and r.score(["What is 2 + 2?"])[3]["cached"] == 1  # the cache keeps exact texts
    assert np.abs(out["full"] - out["evidence"]).max() > 1e-4  # the LM's logit moves the full path's p


def test_unknown_scoring_path(router_dir):
    with pytest.raises(ValueError, match="scoring must be"):
        OnlineRouter(router_dir, scoring="fast")


def test_auto_takes_the_evidence_path_only_when_the_lm_is_silent(router_dir, tmp_path):
    """A router whose LM weight stayed 0 is scored by the evidence alone, with the full path's p."""
    import shutil

    from safetensors.torch import load_file, save_file

    assert OnlineRouter(router_dir).scoring == "full"  # this router's LM speaks
    silent = shutil.copytree(router_dir, tmp_path / "silent")
    tensors = load_file(silent / "projector.safetensors")
    tensors["evidence.lm_weight"] = torch.zeros(1)
    save_file(tensors, silent / "projector.safetensors")
    auto, full = OnlineRouter(silent), OnlineRouter(silent, scoring="full")
    assert auto.scoring == "evidence"
    routable = {"m0": [i % 2 == 0 for i in range(K)], "m1": [i % 3 == 0 for i in range(K)]}
    auto.sync(routable)
    full.sync(routable)
    texts = ["Who wrote Hamlet?", "What is 2 + 2?"]
    assert np.abs(auto.score(texts)[1] - full.score(texts)[1]).max() < 1e-5  # float32 torch vs float64 numpy


def test_evidence_mass_for_the_decision_layer(router_dir, tmp_path):
    """With a decision block the mass comes back, the same on both paths (the evidence path reuses its similarities)."""
    import shutil

    from icl_router.model.router_dir import write_decision
    from icl_router.routing.decision import DecisionParams, cosine, evidence_mass

    path = shutil.copytree(router_dir, tmp_path / "router")
    write_decision(path, DecisionParams(tau=0.1, prior_weight=1.0).to_json())
    texts = ["Who wrote Hamlet?", "What is 2 + 2?"]
    masses = []
    for s in ("full", "evidence"):
        r = OnlineRouter(path, scoring=s)
        r.sync({"m0": [True] * K})
        mass = r.score(texts).mass
        masses.append(mass)
    emb = r.embed(texts)[0]
    want = evidence_mass(cosine(emb, r.anchor_emb), 0.1)
    assert np.abs(masses[0] - want).max() < 1e-9 and np.abs(masses[1] - want).max() < 1e-6


def test_mismatched_embedder_is_refused_by_name(router_dir):
    with pytest.raises(EmbedderError, match=r"anchors were embedded with 'all-MiniLM-L6-v2' \(sentence-transformers\) but the queries would be embedded with 'all-MiniLM-L6-v2@onnx-int8'"):
        OnlineRouter(router_dir, embedder=f"{BUNDLED}@onnx-int8")


def test_a_bulk_embedding_goes_by_length_in_chunks_and_keeps_each_texts_vector(routers):
    r = routers["evidence"]
    assert r.direct  # the modules are called directly: the chunked path is under test
    texts = [("word " * (1 + (i * 7) % 40)).strip() + f" {i}" for i in range(70)]  # lengths out of order, over two chunks
    got = r._forward(texts, batch=32)  # [Q, E]
    ref = r.embedder.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert got.shape == (70, E) and np.abs(got - ref).max() < 1e-4
