"""``icl-router value`` end to end in-process (no Ray): outputs, and every bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from icl_router import schemas as S
from icl_router.cli import main
from icl_router.config import ConfigError, ValueConfig, load_config
from icl_router.data.dataset import Dataset, DatasetError
from icl_router.value import run_value

REPO = Path(__file__).resolve().parents[2]
K = 12
ROW_KEYS = {"model", "gain", "traffic_share", "cost_change"}


def _cfg(base: dict, **kw) -> ValueConfig:
    return ValueConfig.model_validate({**base, **kw})


def _outcome_files(ds: Dataset) -> dict[str, bytes]:
    return {str(p.relative_to(ds.root)): p.read_bytes() for p in sorted(ds.outcomes_dir.rglob("*")) if p.is_file()}


def test_value_writes_ranked_json_md_and_png(value_setup):
    ds, router, base = value_setup
    out = run_value(_cfg(base, candidates=[{"name": "m-strong"}, {"name": "m-best"}], costs={"m-weak": 0.001, "m-mid": 0.002, "m-strong": 0.004, "m-best": 0.01}))
    result = json.loads((Path(base["output"]) / "value.json").read_text())
    assert out["output"] == base["output"] and out["best_candidate"] == result["candidates"][0]
    for key in ("candidates", "removals"):
        rows = result[key]
        assert all(set(r) == ROW_KEYS for r in rows), rows
        assert [r["gain"] for r in rows] == sorted((r["gain"] for r in rows), reverse=True)
        assert all(0.0 <= r["traffic_share"] <= 1.0 and isinstance(r["cost_change"], float) for r in rows)
    assert sorted(r["model"] for r in result["candidates"]) == ["m-best", "m-strong"]
    assert sorted(r["model"] for r in result["removals"]) == ["m-mid", "m-weak"]
    assert result["pool"] == ["m-weak", "m-mid"] and result["queries"] == 60 - K and result["estimator"] == "eb"
    assert [g["size"] for g in result["greedy"]] == [1, 2, 3, 4]
    md = (Path(base["output"]) / "value.md").read_text()
    assert md.index(f"`{result['candidates'][0]['model']}`") < md.index(f"`{result['candidates'][1]['model']}`")
    assert (Path(base["output"]) / "value.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inline_and_registered_profiles_and_every_estimator(value_setup):
    ds, router, base = value_setup
    anchors = json.loads((router / "icl_router.json").read_text())["anchor_query_ids"]
    best = (ds.correctness(anchors, ["m-best"])[:, 0] >= 0.5).tolist()
    gains = {}
    for est in ("eb", "naive", "eb-pair", "crossfit"):
        run_value(_cfg(base, pool=["m-weak"], candidates=[{"name": "m-mid"}, {"name": "inline-best", "profile": best}], estimator=est))
        result = json.loads((Path(base["output"]) / "value.json").read_text())
        gains[est] = {r["model"]: r["gain"] for r in result["candidates"]}
        assert set(gains[est]) == {"m-mid", "inline-best"}  # m-mid: registered but outside the pool
    assert len({json.dumps(g, sort_keys=True) for g in gains.values()}) > 1  # the estimators score differently


BAD = {
    "no profile, no serving path": (
        {"candidates": [{"name": "m-ghost"}]},
        ConfigError,
        r"candidates\[0\] \('m-ghost'\) has no profile and no serving path: .* outcomes on 0 of the router's 12 anchors\. Give candidates\[0\]\.serving",
    ),
    "profile of the wrong length": (
        {"candidates": [{"name": "m-x", "profile": [True, False, True]}]},
        ConfigError,
        r"candidates\[0\] \('m-x'\)\.profile has 3 outcomes; the router has K=12 anchors",
    ),
    "answers that cannot be graded": (
        {"candidates": [{"name": "m-best"}, {"name": "m-new", "serving": {"path": "/models/m-new"}}]},
        DatasetError,
        r"cannot profile \['m-new'\] on the router's anchors: 12 selected queries cannot be graded: .*need a gold",
    ),
    "evaluation set without the router's embeddings": (
        {"candidates": [{"name": "m-best"}], "evaluation": {"dataset": "<noemb>", "split": None}},
        DatasetError,
        r"^evaluation\.dataset .*noemb: 48 of its 48 evaluation queries have no embedding from the router's embedder 'test-embedder' "
        r"\(e\.g\. .*; it holds no embeddings\).*: embed them first: icl-router embed .* embedder=test-embedder$",
    ),
    "evaluation set embedded by another model": (
        {"candidates": [{"name": "m-best"}], "evaluation": {"dataset": "<otheremb>", "split": None}},
        DatasetError,
        r"^evaluation\.dataset .*otheremb: 48 of its 48 evaluation queries have no embedding from the router's embedder 'test-embedder' "
        r"\(e\.g\. .*; it holds embeddings from \['other-embedder'\] only\).*: embed them first: icl-router embed .* embedder=test-embedder$",
    ),
    "a cost policy without costs": (
        {"candidates": [{"name": "m-best"}], "policy": {"kind": "cost", "cost_weight": 10.0}},
        ConfigError,
        r"policy 'cost' needs a cost per model; \['m-weak', 'm-mid', 'm-best'\] have none: set costs\.<model>",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_changes_nothing(value_setup, tmp_path, case):
    ds, router, base = value_setup
    noemb = Dataset(tmp_path / "noemb")
    noemb.write_queries(ds.read_queries())
    otheremb = Dataset(tmp_path / "otheremb")
    otheremb.write_queries(ds.read_queries())
    emb = ds.read_embeddings("test-embedder")
    otheremb.append_embeddings(emb.set_column(emb.schema.get_field_index(S.EMBEDDER), S.EMBEDDER, pa.array(["other-embedder"] * len(emb))))
    extra, error, pattern = BAD[case]
    extra = json.loads(json.dumps(extra).replace("<noemb>", str(noemb.root)).replace("<otheremb>", str(otheremb.root)))
    before, router_before = _outcome_files(ds), {p.name: p.read_bytes() for p in router.iterdir()}
    with pytest.raises(error, match=pattern) as raised:
        run_value(_cfg(base, **extra))
    assert "\n" not in str(raised.value)  # one line: the CLI prints it as is
    assert _outcome_files(ds) == before
    assert {p.name: p.read_bytes() for p in router.iterdir()} == router_before
    assert not Path(base["output"]).exists()


def test_bad_input_leaves_earlier_outputs_as_they_were(value_setup):
    ds, router, base = value_setup
    run_value(_cfg(base, candidates=[{"name": "m-best"}]))
    out = Path(base["output"])
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(written) == ["value.json", "value.md", "value.png"]
    with pytest.raises(ConfigError, match=r"candidates\[1\] \('m-x'\)\.profile has 2 outcomes"):
        run_value(_cfg(base, candidates=[{"name": "m-best"}, {"name": "m-x", "profile": [True, False]}]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="serving.name 'other' differs"):
        ValueConfig.model_validate({"router": "r", "candidates": [{"name": "a", "serving": {"name": "other", "path": "/m"}}]})
    with pytest.raises(ValueError, match=r"\['a'\] are in the pool and among the candidates"):
        ValueConfig.model_validate({"router": "r", "pool": ["a"], "candidates": [{"name": "a"}]})
    cfg = ValueConfig.model_validate({"router": "r", "candidates": [{"name": "a", "serving": {"path": "/m"}}]})
    assert cfg.candidates[0].serving.name == "a"
    shipped = load_config(ValueConfig, REPO / "jobs" / "value" / "config.yaml")
    assert shipped.estimator == "eb" and [c.name for c in shipped.candidates] == ["synth-logic-8b", "synth-word-3b"]


def test_cli_value(value_setup, tmp_path, capsys):
    ds, router, base = value_setup
    cfg = tmp_path / "value.yaml"
    cfg.write_text(yaml.safe_dump({**base, "candidates": [{"name": "m-best"}]}))
    main(["value", "--config", str(cfg), "--output", str(tmp_path / "cli-out")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["best_candidate"]["model"] == "m-best" and (tmp_path / "cli-out" / "value.json").is_file()
    with pytest.raises(SystemExit) as e:
        main(["value", "--config", str(cfg), "candidates=[{name: m-ghost}]"])
    assert e.value.code == 2
    assert "icl-router value: candidates[0] ('m-ghost') has no profile and no serving path" in capsys.readouterr().err


def test_a_router_embedded_by_a_variant_reads_that_variants_embeddings(value_setup):
    """`icl-router demo embedder=<model>@onnx-int8` once stopped at its value step: the router directory
    records the variant and the dataset's rows carry `<model>@onnx-int8`, but the lookup used the bare name."""
    ds, router, base = value_setup
    meta_path = router / "icl_router.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "embedder_variant": "onnx-int8"}))
    emb = ds.read_embeddings("test-embedder")
    ds.append_embeddings(emb.set_column(emb.schema.get_field_index(S.EMBEDDER), S.EMBEDDER, pa.array(["test-embedder@onnx-int8"] * len(emb))))
    run_value(_cfg(base, candidates=[{"name": "m-best"}]))
    assert json.loads((Path(base["output"]) / "value.json").read_text())["embedder"] == "test-embedder@onnx-int8"
