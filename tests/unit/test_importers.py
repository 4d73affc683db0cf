"""Importers on the real public data (../shared/data/routing) and on bad input."""

from __future__ import annotations

import ast
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from icl_router import cli
from icl_router import schemas as S
from icl_router.data.dataset import Dataset, DatasetError
from icl_router.data.importers import METRIC_GRADERS, ZEROEVAL_GRADERS, import_dataset

ROUTING = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "routing"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "iclrouter"
needs_data = pytest.mark.skipif(not ROUTING.is_dir(), reason=f"real routing data not found at {ROUTING}")


def _jsonl(*paths: Path) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]


def _cells(ds: Dataset) -> dict[tuple[str, str], dict]:
    """(query, model) -> outcome row; fails on a second outcome for the same cell."""
    cells = {}
    for row in ds.read_outcomes().to_pylist():
        key = (row[S.QUERY_ID], row[S.MODEL_ID])
        assert key not in cells, f"two outcomes for {key}"
        cells[key] = row
    return cells


def _accuracy_from_json(records: list[dict]) -> dict[str, float]:
    hits = defaultdict(list)
    for r in records:
        for m, v in r["labels"].items():
            if v is not None:
                hits[m].append(v >= S.CORRECT_THRESHOLD)
    return {m: float(np.mean(h)) for m, h in hits.items()}


def _check_accuracy(ds: Dataset, records: list[dict]) -> None:
    cells = _cells(ds)
    got = defaultdict(list)
    for (_, m), row in cells.items():
        got[m].append(row[S.CORRECT])
    want = _accuracy_from_json(records)
    assert set(got) == set(want)
    for m in want:
        assert np.mean(got[m]) == pytest.approx(want[m], abs=1e-12), m
    # the summary rounds to 4 places; its mean may round the other way at the last place than ours
    assert ds.summary()["accuracy"] == pytest.approx(want, abs=1e-4)


# -- real data: each file imported once per module ---------------------------------


@pytest.fixture(scope="module")
def llmrouter(tmp_path_factory):
    files = [ROUTING / "llmrouter" / "train.jsonl", ROUTING / "llmrouter" / "test.jsonl"]
    out = tmp_path_factory.mktemp("imp") / "llmrouter"
    return import_dataset("llmrouter", [str(f) for f in files], out), _jsonl(*files)


@pytest.fixture(scope="module")
def zeroeval(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "zeroeval"
    return import_dataset("zeroeval", [str(ROUTING / "zeroeval")], out), _jsonl(ROUTING / "zeroeval" / "matrix.jsonl")


@pytest.fixture(scope="module")
def routerbench(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "routerbench"
    files = sorted((ROUTING / "routerbench").glob("*.jsonl"))
    rows = [(f, n, json.loads(line)) for f in files for n, line in enumerate(f.read_text().splitlines(), 1)]
    return import_dataset("routerbench", [str(ROUTING / "routerbench")], out), rows


@needs_data
def test_llmrouter_pooled_train_then_test(llmrouter):
    ds, records = llmrouter
    q = ds.read_queries()
    assert len(records) == 5988 and len(q) == 5988
    # the standard protocol indexes queries by position: file order, train before test
    assert q.column(S.QUERY_ID).to_pylist() == [r["id"] for r in records]
    assert q.column(S.SPLIT).to_pylist() == ["train"] * 5607 + ["test"] * 381
    assert q.column(S.TEXT).to_pylist() == [r["question"] for r in records]
    golds = q.column(S.GOLD).to_pylist()
    assert [g for g, r in zip(golds, records) if r["task"] != "human_eval"] == [r["gold"] for r in records if r["task"] != "human_eval"]
    # HumanEval's test code alone calls nothing: with its prompt it becomes the gradable dict form
    humaneval = [(json.loads(g), r) for g, r in zip(golds, records) if r["task"] == "human_eval"]
    assert len(humaneval) == 164 and all(g["test"] == r["gold"] and g["prompt"] == r["question"] for g, r in humaneval)
    assert all(f"def {g['entry_point']}(" in r["question"] for g, r in humaneval)
    assert q.column(S.METRIC).to_pylist() == [r["metric"] for r in records]
    assert q.column(S.GRADER).to_pylist() == [METRIC_GRADERS[r["metric"]] for r in records]
    cells = _cells(ds)
    models = sorted(records[0]["labels"])
    assert len(models) == 9 and len(cells) == 5988 * 9
    assert all((r["id"], m) in cells for r in records for m in models)
    fractional = [(r["id"], m, v) for r in records for m, v in r["labels"].items() if 0 < v < 1]
    assert fractional, "F1-style scores exist in this data; the threshold must be exercised"
    for qid, m, v in fractional:
        # float values copied through Parquet: compared as values, to a tolerance far below any real score
        assert cells[(qid, m)][S.SCORE] == pytest.approx(v, abs=1e-12) and cells[(qid, m)][S.CORRECT] == (v >= 0.5)
    _check_accuracy(ds, records)


@needs_data
def test_zeroeval_matrix(zeroeval):
    ds, records = zeroeval
    s = ds.summary()
    assert (s["n_queries"], s["n_models"], s["n_outcomes"]) == (2840, 29, 2840 * 29)
    q = ds.read_queries()
    assert q.column(S.GRADER).to_pylist() == [ZEROEVAL_GRADERS[r["task"]] for r in records]
    _check_accuracy(ds, records)


@needs_data
def test_routerbench_rejoins_split_rows_and_keeps_costs(routerbench):
    ds, rows = routerbench
    by_id = defaultdict(list)
    for _, _, r in rows:
        by_id[r["id"]].append(r)
    split_ids = [i for i, rs in by_id.items() if len(rs) > 1]
    assert len(rows) == 3178 and split_ids, "the source splits some queries over two rows"
    models = sorted(rows[0][2]["labels"])
    cells = _cells(ds)
    assert ds.summary()["n_queries"] == len(by_id) and len(models) == 11
    # every cell is filled once after the halves are rejoined, and keeps the cost of the row that labelled it
    assert len(cells) == len(by_id) * 11
    for qid, rs in by_id.items():
        for m in models:
            src = [r for r in rs if r["labels"][m] is not None]
            assert len(src) == 1, (qid, m)
            cell = cells[(qid, m)]
            # float values copied through Parquet: compared as values, to a tolerance below any real difference
            assert cell[S.SCORE] == pytest.approx(src[0]["labels"][m], abs=1e-12)
            assert cell[S.COST] == pytest.approx(src[0]["cost"][m], rel=1e-12, abs=0)
    texts = dict(zip(ds.read_queries().column(S.QUERY_ID).to_pylist(), ds.read_queries().column(S.TEXT).to_pylist()))
    for qid in split_ids:
        assert texts[qid] == ast.literal_eval(by_id[qid][0]["prompt"])[0]
    _check_accuracy(ds, [r for _, _, r in rows])


@needs_data
def test_routerbench_null_cell_errors_by_default_and_skip_drops_it(tmp_path):
    path = ROUTING / "routerbench" / "arc_challenge_test.jsonl"
    records = _jsonl(path)
    first_null = next((n, m) for n, r in enumerate(records, 1) for m, v in r["labels"].items() if v is None)
    with pytest.raises(DatasetError) as e:
        import_dataset("routerbench", [str(path)], tmp_path / "out")
    msg = str(e.value)
    assert f"{path}:{first_null[0]}:" in msg and f"labels[{first_null[1]!r}]" in msg and "--on-missing-label skip" in msg
    assert not (tmp_path / "out").exists()

    filled = defaultdict(set)
    for r in records:
        filled[r["id"]] |= {m for m, v in r["labels"].items() if v is not None}
    n_models = len(records[0]["labels"])
    empty = sum(n_models - len(ms) for ms in filled.values())
    s = import_dataset("routerbench", [str(path)], tmp_path / "out", on_missing_label="skip").summary()
    assert empty > 0 and s["n_missing_outcomes"] == empty and s["n_outcomes"] == len(filled) * n_models - empty


@needs_data
def test_cli_import_of_a_folder_keeps_train_before_test(llmrouter, tmp_path, capsys):
    cli.main(["import", "--format", "llmrouter", "--input", str(ROUTING / "llmrouter"), "--output", str(tmp_path / "ds")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_queries"] == 5988 and summary["n_models"] == 9
    ids = Dataset(tmp_path / "ds").read_queries().column(S.QUERY_ID).to_pylist()
    assert ids == llmrouter[0].read_queries().column(S.QUERY_ID).to_pylist()


# -- the ICL-Router release format ------------------------------------------------------


def _release(name: str) -> list:
    return json.loads((FIXTURE / name).read_text())


def test_iclrouter_fixture(tmp_path):
    ds = import_dataset("iclrouter", [str(FIXTURE)], tmp_path / "ds")
    q = {r[S.QUERY_ID]: r for r in ds.read_queries().to_pylist()}
    cells = _cells(ds)
    rows = [(r, "train") for r in _release("train_router.json")] + [(r, "test") for r in _release("test_router.json")]
    for r, split in rows:
        qid = f"{r['task']}-{r['index']}"
        assert q[qid][S.TEXT] == r["query"] and q[qid][S.SPLIT] == split and q[qid][S.TASK] == r["task"]
        assert cells[(qid, r["model"])][S.CORRECT] == r["is_correct_direct"]
    gold = {x["question"]: x["answer"] or None for f in ("question_train.json", "question_test.json") for x in _release(f)}
    by_text = {r[S.TEXT]: r for r in q.values()}
    assert all(by_text[t][S.GOLD] == g for t, g in gold.items())
    # a stage-1 text without routing rows is kept, with no outcomes
    (stage1,) = [r for r in q.values() if r[S.SPLIT] == "stage1"]
    assert not any(k[0] == stage1[S.QUERY_ID] for k in cells)
    # profile entries are outcomes; one that is no routing query becomes an "anchor" query
    for model, items in _release("experts_information_3.json").items():
        for it in items:
            assert cells[(by_text[it["input"]][S.QUERY_ID], model)][S.CORRECT] == (it["label"] == "Yes")
    assert sum(r[S.SPLIT] == "anchor" for r in q.values()) == 1
    assert ds.summary()["n_models"] == 3


def test_iclrouter_profile_contradicting_a_row_is_an_error(tmp_path):
    src = tmp_path / "release"
    shutil.copytree(FIXTURE, src)
    experts = _release("experts_information_3.json")
    model = next(iter(experts))
    experts[model][0]["label"] = "No" if experts[model][0]["label"] == "Yes" else "Yes"
    (src / "experts_information_3.json").write_text(json.dumps(experts))
    with pytest.raises(DatasetError, match=rf"experts_information_3.json: \['{model}'\]\[0\].*train_router.json:\d+.*labels\['{model}'\]"):
        import_dataset("iclrouter", [str(src)], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# -- bad input: clear message, nothing written ---------------------------------------------


def _rec(qid: str, **kw) -> dict:
    r = {"id": qid, "task": "gsm8k", "question": f"question {qid}", "gold": "1", "metric": "GSM8K", "labels": {"a": 1.0, "b": 0.0}}
    return r | kw


GOOD = [_rec("q0"), _rec("q1", labels={"a": 0.0, "b": 0.75})]
BAD = {
    # name: (line 3 of the file, words the message must hold)
    "missing label": (_rec("q2", labels={"a": 1.0}), ["labels['b']", "missing", "--on-missing-label skip"]),
    "null label": (_rec("q2", labels={"a": 1.0, "b": None}), ["labels['b']", "null", "--on-missing-label skip"]),
    "non-numeric label": (_rec("q2", labels={"a": 1.0, "b": "yes"}), ["labels['b']", "must be a number", "'yes'"]),
    "label out of range": (_rec("q2", labels={"a": 1.0, "b": 2.0}), ["labels['b']", "[0, 1]"]),
    "labels not an object": (_rec("q2", labels=[1.0, 0.0]), ["'labels'", "must be an object", "list"]),
    "question not a string": (_rec("q2", question=12), ["'question'", "must be a string", "int"]),
    "id missing": ({k: v for k, v in _rec("q2").items() if k != "id"}, ["'id'", "missing"]),
    "broken line": ('{"id": "q2", "task": "gsm8k", "labels": {', ["not valid JSON"]),
    "conflicting duplicate": (_rec("q0", labels={"a": 0.0, "b": 0.0}), ["'q0'", "labels['a']", ":1"]),
    "duplicate with other text": (_rec("q0", question="another text"), ["'q0'", "text", ":1"]),
}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, case):
    bad, words = BAD[case]
    src = _write(tmp_path / "train.jsonl", GOOD + [bad])
    out = tmp_path / "ds"
    with pytest.raises(DatasetError) as e:
        import_dataset("llmrouter", [str(src)], out)
    msg = str(e.value)
    assert f"{src}:3" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]

    # an existing dataset survives a failed --overwrite untouched
    good = _write(tmp_path / "good.jsonl", GOOD)
    import_dataset("llmrouter", [str(good)], out)
    before = _snapshot(out)
    with pytest.raises(DatasetError):
        import_dataset("llmrouter", [str(src)], out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "good.jsonl", "train.jsonl"]


def test_agreeing_duplicates_across_inputs_are_kept_once(tmp_path):
    a = _write(tmp_path / "train.jsonl", GOOD)
    b = _write(tmp_path / "test.jsonl", [GOOD[1], _rec("q9")])
    ds = import_dataset("llmrouter", [str(a), str(b)], tmp_path / "ds")
    q = ds.read_queries()
    assert q.column(S.QUERY_ID).to_pylist() == ["q0", "q1", "q9"]
    assert q.column(S.SPLIT).to_pylist() == ["train", "train", "test"]
    assert len(_cells(ds)) == 6


def test_existing_output_needs_overwrite_and_missing_input_is_named(tmp_path):
    src = _write(tmp_path / "train.jsonl", GOOD)
    import_dataset("llmrouter", [str(src)], tmp_path / "ds")
    with pytest.raises(DatasetError, match="--overwrite"):
        import_dataset("llmrouter", [str(src)], tmp_path / "ds")
    with pytest.raises(DatasetError, match="nope.jsonl: no such file"):
        import_dataset("llmrouter", [str(tmp_path / "nope.jsonl")], tmp_path / "ds2")


def test_routerbench_prompt_must_be_a_list_literal_of_one_text(tmp_path):
    rec = {"id": "r0", "task": "mbpp", "labels": {"a": 1.0}, "cost": {"a": 1e-4}}
    for prompt in ["just text", "['one', 'two']", "[1]"]:
        src = _write(tmp_path / "mbpp_train.jsonl", [rec | {"prompt": "['fine']"}, rec | {"id": "r1", "prompt": prompt}])
        with pytest.raises(DatasetError, match=r"mbpp_train.jsonl:2: field 'prompt' must be a Python list literal"):
            import_dataset("routerbench", [str(src)], tmp_path / "ds")
    src = _write(tmp_path / "mbpp_train.jsonl", [rec | {"prompt": "['same', 'same']"}])
    ds = import_dataset("routerbench", [str(src)], tmp_path / "ds")
    assert ds.read_queries().column(S.TEXT).to_pylist() == ["same"]
    assert ds.read_outcomes().column(S.COST).to_pylist() == pytest.approx([1e-4], rel=1e-12)  # a float copied through


@needs_data
def test_llmrouter_code_golds_grade_the_reference_solutions(llmrouter):
    """MBPP's list-literal gold and HumanEval's check() gold, as imported, fail a wrong answer."""
    from icl_router.graders import grade

    ds, records = llmrouter
    q = ds.read_queries().to_pylist()
    mbpp = next(r for r in q if r[S.TASK] == "mbpp")
    he = next(r for r in q if r[S.TASK] == "human_eval")
    for row in (mbpp, he):
        assert grade("code", "```python\ndef nothing():\n    pass\n```", row[S.GOLD]) == 0.0
