"""Registering a model into a router directory from its anchor outcomes, with no training."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from icl_router import schemas as S
from icl_router.cli import main
from icl_router.data.dataset import DatasetError
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.model.router_dir import PROFILES_FILE, RouterMeta, read_profiles, save_router_dir
from icl_router.routing.register import register_model, register_models
from icl_router.routing.scorer import Scorer

K, E = 6, 16


@pytest.fixture
def router_dir(tmp_path, small_dataset, tiny_router_lm):
    """A tiny random-weight router whose anchors are the dataset's first K queries; pool: m-weak, m-mid.
    Function-scoped: the tests register into it and change it."""
    anchors = small_dataset.read_queries().column(S.QUERY_ID).to_pylist()[:K]
    lm, tok = tiny_router_lm  # read-only: the router is saved, and later loaded from its directory
    layout = PromptLayout(tok, query_input="text", profile_layout="fused")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(K, E))
    meta = RouterMeta("test-embedder", E, "text", "fused", layout.placeholder_id, layout.yes_id, layout.no_id, anchors)
    prof = small_dataset.correctness(anchors, ["m-weak", "m-mid"]) >= 0.5  # [K, 2]
    return save_router_dir(router, tmp_path / "router", meta=meta, pool={"m-weak": prof[:, 0], "m-mid": prof[:, 1]})


def test_register_then_score(router_dir, small_dataset):
    anchors = json.loads((router_dir / "icl_router.json").read_text())["anchor_query_ids"]
    want = small_dataset.correctness(anchors, ["m-best"])[:, 0] >= 0.5
    out = register_model(router_dir, small_dataset.root, "m-best")
    assert (out["model_id"], out["replaced"]) == ("m-best", False)
    assert out["profile_accuracy"] == pytest.approx(float(want.mean()), abs=1e-4)  # reported rounded to 4 places
    pool = read_profiles(router_dir / PROFILES_FILE, anchors)
    assert list(pool) == ["m-weak", "m-mid", "m-best"]
    np.testing.assert_array_equal(pool["m-best"], want)

    scorer = Scorer.from_dir(router_dir)
    assert scorer.models == ["m-weak", "m-mid", "m-best"]
    texts = ["question 7 about gsm8k", "a much longer question about mmlu and history and rivers and the capital city"]
    p = scorer.score(texts)
    ref = Scorer(scorer.router, {"x": want}).score(texts)  # the same profile added by hand
    np.testing.assert_allclose(p[:, [2]], ref, atol=1e-6)  # float32: a pool of 3 batches rows unlike a pool of 1

    # re-registering replaces the profile and keeps the pool order
    out = register_models(router_dir, small_dataset.root, ["m-best", "m-strong"])
    assert [r["replaced"] for r in out["registered"]] == [True, False]
    assert out["pool"] == ["m-weak", "m-mid", "m-best", "m-strong"]
    assert len(read_profiles(router_dir / PROFILES_FILE, anchors)) == 4


def test_missing_anchors_and_unknown_models_are_refused_and_change_nothing(router_dir, small_dataset):
    anchors = json.loads((router_dir / "icl_router.json").read_text())["anchor_query_ids"]
    have = anchors[:2] + anchors[4:]  # no outcomes on anchors[2], anchors[3]
    small_dataset.append_outcomes(
        pa.table({S.QUERY_ID: have, S.MODEL_ID: ["m-new"] * len(have), S.SAMPLE: [0] * len(have), S.SCORE: [1.0] * len(have), S.CORRECT: [True] * len(have)})
    )
    before = (router_dir / PROFILES_FILE).read_bytes()
    with pytest.raises(DatasetError) as e:
        register_models(router_dir, small_dataset.root, ["m-best", "m-new"])  # one bad model: none registered
    msg = str(e.value)
    assert f"'m-new' lacks outcomes on 2 of the router's {K} anchors: {[anchors[2], anchors[3]]}" in msg
    assert "m-best" not in msg
    with pytest.raises(DatasetError, match=r"\['m-nope'\] have no outcomes.*has models \['m-best', 'm-mid', 'm-new', 'm-strong', 'm-weak'\]"):
        register_model(router_dir, small_dataset.root, "m-nope")
    assert (router_dir / PROFILES_FILE).read_bytes() == before
    assert sorted(p.name for p in router_dir.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_cli_register(router_dir, small_dataset, capsys):
    main(["register", "--router", str(router_dir), "--dataset", str(small_dataset.root), "--model", "m-strong", "--model", "m-best"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pool"] == ["m-weak", "m-mid", "m-strong", "m-best"]
    with pytest.raises(SystemExit) as e:
        main(["register", "--router", str(router_dir), "--dataset", str(small_dataset.root), "--model", "m-nope"])
    assert e.value.code == 2 and "m-nope" in capsys.readouterr().err
