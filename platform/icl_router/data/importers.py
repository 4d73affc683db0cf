"""Importers: public routing data -> a dataset directory (docs/design.md §5).

Formats:
- ``llmrouter``: JSONL ``{"id", "task", "question", "gold", "metric", "labels": {model: score}}``.
- ``zeroeval``: JSONL ``{"id", "task", "question", "gold", "labels": {model: 0|1}}``.
- ``routerbench``: JSONL ``{"id", "task", "prompt", "labels", "cost"}``; ``prompt`` is a
  Python list literal holding the prompt string.
- ``local``: LLMRouter's JSONL for the questions, with the outcomes that the packaged real LMs
  (``icl-router models``) got on them here instead of LLMRouter's labels: the file
  ``icl_router/resources/local-outcomes.parquet`` (query ids and labels, no text; written by
  ``icl-router export-outcomes`` after ``icl-router profile --config jobs/profile/local.yaml``).
  Only the questions it has outcomes for are kept.
- ``iclrouter``: the authors' release of arXiv 2510.09719 (github NavairaRehman/ICL-Router,
  data on huggingface lalalamdbf/ICL-Router): ``train_router.json`` / ``test_router.json``
  (JSON lists of ``{query, model, is_correct_direct, task, index}``, one row per (query,
  model); ``is_correct`` samples are ignored, the greedy label is sample 0),
  ``question_*.json`` (lists of ``{question, answer}``: stage-1 texts; their answers
  become gold) and ``experts_information_*.json`` (``{model: [{input, label: Yes|No,
  task}]}``: each model's profile, read as outcomes).

Rows with the same query id are pooled when they agree (same text and task, no model
labelled differently); their labels are united, which also rejoins a query whose labels
the source split over two rows (RouterBench does this for 14 ARC-C questions).
Everything is parsed and checked in memory; nothing is written unless all input is
valid, and then the dataset is written aside and renamed into place.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa

from icl_router import schemas
from icl_router.data.dataset import Dataset, DatasetError, write_dataset_atomically
from icl_router.kinds import DatasetFormat

FORMATS: tuple[str, ...] = get_args(DatasetFormat)

# LLMRouter's metric names -> our grader names; an unknown metric keeps its own name.
METRIC_GRADERS = {
    "em_mc": "multiple_choice",
    "f1_score": "f1",
    "MATH": "math",
    "GSM8K": "gsm8k",
    "code_eval": "code",
    "commongen_coverage": "commongen",
}
ZEROEVAL_GRADERS = {"gsm": "gsm8k", "math-l5": "math", "crux": "crux"}

# The outcomes of the packaged real LMs on LLMRouter's questions (format ``local``).
LOCAL_OUTCOMES = "local-outcomes.parquet"

# Queries that only the stage-1 question files know: text without outcomes, by design.
STAGE1 = "stage1"


@dataclass
class _Query:
    query_id: str
    text: str
    task: str
    split: str
    where: str  # "file:line" of the first row that named this query
    labels: dict[str, float | None] = field(default_factory=dict)
    cost: dict[str, float | None] = field(default_factory=dict)
    gold: str | None = None
    grader: str | None = None
    metric: str | None = None


# -- reading and checking --------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}); fix or delete the line") from None
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}; fix the line")
            yield f"{path}:{n}", rec


def _read_json(path: Path) -> tuple[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix the file") from None


def _read_json_list(path: Path) -> Iterator[tuple[str, dict]]:
    """The objects of a file holding one JSON list, each with the line it starts on."""
    text, data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}:1: the file must hold a JSON list of records, got {type(data).__name__}")
    dec, pos, line = json.JSONDecoder(), text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    ws = " \t\r\n"
    for _ in data:  # walk the text again only to learn where each item starts
        start = pos
        while text[pos] in ws:
            pos += 1
        line += text.count("\n", start, pos)
        rec, end = dec.raw_decode(text, pos)
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}:{line}: a record must be a JSON object, got {type(rec).__name__}")
        yield f"{path}:{line}", rec
        line += text.count("\n", pos, end)
        pos = end
        while text[pos] in ws + ",":
            line += text[pos] == "\n"
            pos += 1


_KINDS = {str: "a string", dict: "an object", list: "a list", int: "an integer"}


def _get(rec: dict, name: str, kind: type | tuple[type, ...], where: str, *, required: bool = True) -> Any:
    value = rec.get(name)
    if value is None:
        if required:
            raise DatasetError(f"{where}: field {name!r} is missing or null; every record needs it")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = " or ".join(_KINDS.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DatasetError(f"{where}: field {name!r} must be {want}, got {type(value).__name__} {_short(value)}; fix the record")
    return value


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _number(value: Any, where: str, name: str, *, upper: float | None = 1.0) -> float | None:
    """A label or cost: a number (bool counts as 0/1); None stays None (a missing cell)."""
    if value is None:
        return None
    if not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
        raise DatasetError(f"{where}: field {name} must be a number, got {type(value).__name__} {_short(value)}; fix the record")
    value = float(value)
    if value < 0 or (upper is not None and value > upper):
        bounds = f"in [0, {upper:g}]" if upper is not None else ">= 0"
        raise DatasetError(f"{where}: field {name} is {value:g}; it must lie {bounds}")
    return value


def _labels(rec: dict, where: str) -> dict[str, float | None]:
    labels = _get(rec, "labels", dict, where)
    return {m: _number(v, where, f"labels[{m!r}]") for m, v in labels.items()}


def _gold(rec: dict, key: str = "gold") -> str | None:
    gold = rec.get(key)
    return gold if gold is None or isinstance(gold, str) else json.dumps(gold)


def _split_of(path: Path) -> str:
    """'train' / 'test' when the file name says so (train.jsonl, mbpp_test.jsonl, test_router.json)."""
    words = path.stem.replace("-", "_").split("_")
    return "test" if "test" in words and "train" not in words else "train"


# -- the formats -------------------------------------------------------------------


def _humaneval_gold(question: str, gold: str | None) -> str | None:
    """LLMRouter's HumanEval gold is the test code alone (it defines ``check`` and never calls it);
    with the question, which is HumanEval's prompt, it becomes the gradable ``{prompt, test,
    entry_point}`` (the entry point is the prompt's last function)."""
    names = re.findall(r"^def\s+(\w+)\s*\(", question, re.MULTILINE)
    if gold is None or not names or not re.search(r"^def\s+check\s*\(", gold, re.MULTILINE):
        return gold
    return json.dumps({"prompt": question, "test": gold, "entry_point": names[-1]})


def _llmrouter(path: Path) -> Iterator[_Query]:
    for where, rec in _read_jsonl(path):
        metric = _get(rec, "metric", str, where, required=False)
        question, grader = _get(rec, "question", str, where), METRIC_GRADERS.get(metric, metric)
        gold = _gold(rec)
        yield _Query(
            _get(rec, "id", str, where), question, _get(rec, "task", str, where), _split_of(path),
            where, _labels(rec, where), gold=_humaneval_gold(question, gold) if grader == "code" else gold, grader=grader, metric=metric,
        )


def read_local_outcomes() -> dict[str, dict[str, float]]:
    """query_id -> {model_id: score} of the committed outcomes file."""
    from importlib.resources import as_file, files

    import pyarrow.parquet as pq

    with as_file(files("icl_router") / "resources" / LOCAL_OUTCOMES) as path:
        table = pq.read_table(path)
    labels: dict[str, dict[str, float]] = {}
    for q, m, s in zip(*(table.column(c).to_pylist() for c in (schemas.QUERY_ID, schemas.MODEL_ID, schemas.SCORE))):
        labels.setdefault(q, {})[m] = s
    return labels


def _local(files: list[Path]) -> list[_Query]:
    labels = read_local_outcomes()
    rows = [q for path in files for q in _llmrouter(path) if q.query_id in labels]
    missing = set(labels) - {q.query_id for q in rows}
    if missing:
        raise DatasetError(
            f"{len(missing)} questions of {LOCAL_OUTCOMES} are not in the input (e.g. {sorted(missing)[:3]}); "
            "give --input ../shared/data/routing/llmrouter (LLMRouter's train.jsonl and test.jsonl)"
        )
    for q in rows:
        q.labels, q.cost = dict(labels[q.query_id]), {}
    return rows


def _zeroeval(path: Path) -> Iterator[_Query]:
    for where, rec in _read_jsonl(path):
        task = _get(rec, "task", str, where)
        yield _Query(
            _get(rec, "id", str, where), _get(rec, "question", str, where), task, "train", where, _labels(rec, where),
            gold=_gold(rec), grader=ZEROEVAL_GRADERS.get(task),
        )


def _routerbench(path: Path) -> Iterator[_Query]:
    for where, rec in _read_jsonl(path):
        raw = _get(rec, "prompt", str, where)
        try:
            prompt = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            prompt = None
        # 14 ARC-C rows hold the same string twice (and twice the cost): one prompt all the same.
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt) or len(set(prompt)) != 1:
            raise DatasetError(f"{where}: field 'prompt' must be a Python list literal with one string, e.g. \"['...']\", got {_short(raw)}")
        cost = _get(rec, "cost", dict, where, required=False) or {}
        yield _Query(
            _get(rec, "id", str, where), prompt[0], _get(rec, "task", str, where), _split_of(path), where, _labels(rec, where),
            cost={m: _number(v, where, f"cost[{m!r}]", upper=None) for m, v in cost.items()},
        )


def _text_id(text: str) -> str:
    return "q-" + hashlib.sha1(text.encode()).hexdigest()[:16]


def _role(path: Path) -> str | None:
    if path.suffix != ".json":
        return None
    if path.name.startswith("question"):
        return "questions"
    if path.name.startswith("experts_information"):
        return "experts"
    return "rows" if "router" in path.stem else None


def _iclrouter(paths: list[Path]) -> list[_Query]:
    roles: dict[str, list[Path]] = {"rows": [], "questions": [], "experts": []}
    for p in paths:
        role = _role(p)
        if role is None:
            raise DatasetError(f"{p}: not a file of the ICL-Router release; expected question_*.json, train_router.json/test_router.json or experts_information_*.json")
        roles[role].append(p)
    if not roles["rows"]:
        raise DatasetError(f"no train_router.json / test_router.json among {[str(p) for p in paths]}; the routing rows are required")
    queries: list[_Query] = []
    for path in roles["rows"]:
        for where, rec in _read_json_list(path):
            task, model = _get(rec, "task", str, where), _get(rec, "model", str, where)
            index = _get(rec, "index", (int, str), where)
            label = _number(rec.get("is_correct_direct"), where, "is_correct_direct")
            if label is None:
                raise DatasetError(f"{where}: field 'is_correct_direct' is missing or null; every row needs true or false")
            queries.append(_Query(f"{task}-{index}", _get(rec, "query", str, where), task, _split_of(path), where, {model: label}))
    by_text = {q.text: q for q in queries}
    for path in roles["questions"]:
        for where, rec in _read_json_list(path):
            text, gold = _get(rec, "question", str, where), _gold(rec, "answer") or None
            if text in by_text:
                by_text[text].gold = by_text[text].gold or gold
            else:  # a stage-1 text without routing rows: kept, with no outcomes
                task = _get(rec, "task", str, where, required=False) or "unknown"
                index = _get(rec, "index", (int, str), where, required=False)
                q = _Query(f"{task}-{index}" if index is not None else _text_id(text), text, task, STAGE1, where, gold=gold)
                by_text[text] = q
                queries.append(q)
    for path in roles["experts"]:
        _, data = _read_json(path)
        if not isinstance(data, dict):
            raise DatasetError(f"{path}:1: the file must hold an object {{model: [{{input, label, task}}]}}, got {type(data).__name__}")
        for model, items in data.items():
            if not isinstance(items, list):
                raise DatasetError(f"{path}: field [{model!r}] must be a list of {{input, label, task}}, got {type(items).__name__}")
            for i, rec in enumerate(items):
                where = f"{path}: [{model!r}][{i}]"
                if not isinstance(rec, dict):
                    raise DatasetError(f"{where}: a profile entry must be an object {{input, label, task}}")
                text, task, label = _get(rec, "input", str, where), _get(rec, "task", str, where), _get(rec, "label", str, where)
                if label not in ("Yes", "No"):
                    raise DatasetError(f"{where}: field 'label' must be \"Yes\" or \"No\", got {label!r}")
                known = by_text.get(text)  # profiles are drawn from the routing queries; others become "anchor"
                qid = known.query_id if known else _text_id(text)
                split = known.split if known and known.split != STAGE1 else "anchor"
                q = _Query(qid, text, task, split, where, {model: float(label == "Yes")})
                by_text.setdefault(text, q)
                queries.append(q)
    return queries


# -- pooling and writing -------------------------------------------------------------


def _pool(queries: list[_Query]) -> list[_Query]:
    """One query per id, in first-seen order; rows of one id must agree, their labels unite."""
    out: dict[str, _Query] = {}
    for q in queries:
        old = out.get(q.query_id)
        if old is None:
            out[q.query_id] = q
            continue
        if old.split == STAGE1 and q.split != STAGE1:  # a profile entry labels a stage-1 text
            old.split, old.task = q.split, q.task
        clash = [f for f in ("text", "task") if getattr(q, f) != getattr(old, f)]
        clash += [f"labels[{m!r}]" for m, v in q.labels.items() if v is not None and old.labels.get(m) not in (None, v)]
        if clash:
            raise DatasetError(
                f"{q.where}: query id {q.query_id!r} was already read at {old.where} with a different "
                f"{', '.join(clash)}; remove one of the two rows or give it another id"
            )
        for m, v in q.labels.items():
            if old.labels.get(m) is None:  # this row fills a cell the earlier one left empty
                old.labels[m] = v
                old.cost[m] = q.cost.get(m)
        old.gold = old.gold if old.gold is not None else q.gold
    return list(out.values())


def _tables(queries: list[_Query], on_missing_label: str) -> tuple[pa.Table, pa.Table]:
    models = sorted({m for q in queries for m in q.labels})
    cols: dict[str, list] = {c: [] for c in (schemas.QUERY_ID, schemas.MODEL_ID, schemas.SCORE, schemas.COST)}
    for q in queries:
        for m in models:
            score = q.labels.get(m)
            if score is None:
                if q.split == STAGE1 or on_missing_label == "skip":
                    continue
                state = "null" if m in q.labels else "missing"
                raise DatasetError(
                    f"{q.where}: field labels[{m!r}] is {state}: no label for query {q.query_id!r} and model {m!r}; "
                    "pass --on-missing-label skip to import without this outcome"
                )
            cols[schemas.QUERY_ID].append(q.query_id)
            cols[schemas.MODEL_ID].append(m)
            cols[schemas.SCORE].append(score)
            cols[schemas.COST].append(q.cost.get(m))
    outcomes = pa.table(cols)
    outcomes = outcomes.append_column(schemas.SAMPLE, pa.array([0] * len(outcomes), pa.int32()))
    outcomes = outcomes.append_column(schemas.CORRECT, pa.array([s >= schemas.CORRECT_THRESHOLD for s in cols[schemas.SCORE]], pa.bool_()))
    names = (schemas.QUERY_ID, schemas.TEXT, schemas.TASK, schemas.SPLIT, schemas.GOLD, schemas.GRADER, schemas.METRIC)
    attrs = ("query_id", "text", "task", "split", "gold", "grader", "metric")
    queries_table = pa.table({n: [getattr(q, a) for q in queries] for n, a in zip(names, attrs)}, schema=schemas.QUERIES_SCHEMA)
    return queries_table, outcomes


def _expand(fmt: str, inputs: list[str]) -> list[Path]:
    """Files in the given order; a folder gives its files sorted, train before test."""
    pattern = "*.json" if fmt == "iclrouter" else "*.jsonl"
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [f for f in p.glob(pattern) if fmt != "iclrouter" or _role(f)]
            if not found:
                raise DatasetError(f"--input {p}: the folder holds no {pattern} files of the {fmt} format")
            files += sorted(found, key=lambda f: (f.stem.replace("train", "").replace("test", ""), "test" in f.stem, f.name))
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"--input {p}: no such file or folder")
    return files


def import_dataset(fmt: DatasetFormat, inputs: list[str], output: str | Path, *, overwrite: bool = False, on_missing_label: str = "error") -> Dataset:
    """Read ``inputs`` (files or folders, pooled in order) of format ``fmt``; write a dataset at ``output``."""
    if fmt not in FORMATS:
        raise DatasetError(f"format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    if on_missing_label not in ("error", "skip"):
        raise DatasetError(f"on_missing_label={on_missing_label!r}: use 'error' or 'skip'")
    if fmt == "decisions":
        return write_dataset_atomically(output, *decisions_tables(inputs), overwrite=overwrite)
    files = _expand(fmt, inputs)
    if fmt == "iclrouter":
        rows = _iclrouter(files)
    elif fmt == "local":
        rows = _local(files)
    else:
        read = {"llmrouter": _llmrouter, "zeroeval": _zeroeval, "routerbench": _routerbench}[fmt]
        rows = [q for path in files for q in read(path)]
    queries, outcomes = _tables(_pool(rows), on_missing_label)
    return write_dataset_atomically(output, queries, outcomes, overwrite=overwrite)


TRAFFIC_SPLIT = "traffic"  # the split of queries imported from a decision log


def decisions_tables(inputs: list[str], *, since: Any = None) -> tuple[pa.Table, pa.Table]:
    """(queries, outcomes) from decision-log directories (``serving/decision_log.py``; ``decision_log.dir``
    of a serve config): every routed request whose text was logged is a query (id: its request id,
    task: the request's or ``unknown``, split ``traffic``); a feedback ``reference`` becomes its gold
    (with the grader of its task), a feedback ``correct`` / ``score`` an outcome of the model that answered,
    with the answer's cost, latency and tokens. Rows before ``since`` (a datetime) are left out."""
    from icl_router.serving.decision_log import read_log

    queries: dict[str, dict] = {}
    no_text = 0
    feedback: list[dict] = []
    for item in inputs:
        if not Path(item).is_dir():
            raise DatasetError(f"--input {item}: not a decision-log directory (decision_log.dir of the serve config)")
        d = read_log(item, "decisions")
        if d.num_rows == 0 and not (Path(item) / "decisions").is_dir():
            raise DatasetError(f"--input {item}: no decisions/ shards: not a decision-log directory (decision_log.dir of the serve config)")
        for r in d.to_pylist():
            if since is not None and r["time"] < since:
                continue
            if not r["query_text"]:
                no_text += 1
                continue
            queries[r["request_id"]] = r
        feedback += read_log(item, "feedback").to_pylist()
    if not queries:
        raise DatasetError(f"--input {inputs}: no logged request has its text ({no_text} without): serve with decision_log.log_text: true")
    gold: dict[str, tuple[str, str]] = {}
    labels: dict[tuple[str, str], float] = {}
    for f in sorted(feedback, key=lambda f: f["time"]):  # the latest feedback of a kind wins
        if f["request_id"] not in queries:
            continue
        if f["reference"] is not None and f["grader"]:
            gold[f["request_id"]] = (f["reference"], f["grader"])
        score = f["score"] if f["score"] is not None else None if f["correct"] is None else float(f["correct"])
        if score is not None and f["model"]:
            labels[(f["request_id"], f["model"])] = score
    rows = list(queries.values())
    q = pa.table({
        schemas.QUERY_ID: [r["request_id"] for r in rows], schemas.TEXT: [r["query_text"] for r in rows], schemas.TASK: [r["task"] or "unknown" for r in rows],
        schemas.SPLIT: [TRAFFIC_SPLIT] * len(rows), schemas.GOLD: [gold.get(r["request_id"], (None, None))[0] for r in rows],
        schemas.GRADER: [gold.get(r["request_id"], (None, None))[1] for r in rows], schemas.METRIC: [None] * len(rows),
    }, schema=schemas.QUERIES_SCHEMA)
    out = [{schemas.QUERY_ID: rid, schemas.MODEL_ID: m, schemas.SAMPLE: 0, schemas.SCORE: s, schemas.CORRECT: s >= schemas.CORRECT_THRESHOLD, schemas.COST: queries[rid]["cost"],
            schemas.LATENCY_S: queries[rid]["latency_ms"] / 1e3, schemas.PROMPT_TOKENS: queries[rid]["prompt_tokens"],
            schemas.COMPLETION_TOKENS: queries[rid]["completion_tokens"]} for (rid, m), s in labels.items()]
    outcomes = pa.Table.from_pylist(out, schema=pa.schema([schemas.OUTCOMES_SCHEMA.field(c) for c in (
        schemas.QUERY_ID, schemas.MODEL_ID, schemas.SAMPLE, schemas.SCORE, schemas.CORRECT, schemas.COST, schemas.LATENCY_S, schemas.PROMPT_TOKENS, schemas.COMPLETION_TOKENS)]))
    return q, outcomes


def export_outcomes(dataset: str | Path, models: list[str], output: str | Path) -> dict[str, Any]:
    """The models' outcomes in ``dataset`` without any question text (query_id, model_id, score,
    correct; sample 0, in the dataset's query order): what ``local`` reads, safe to commit or share."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ds = Dataset(dataset)
    order = {q: i for i, q in enumerate(ds.read_queries().column(schemas.QUERY_ID).to_pylist())}
    table = ds.read_outcomes(models)
    table = table.filter(pc.equal(table.column(schemas.SAMPLE), 0)).select([schemas.QUERY_ID, schemas.MODEL_ID, schemas.SCORE, schemas.CORRECT])
    absent = sorted(set(models) - set(table.column(schemas.MODEL_ID).to_pylist()))
    if absent:
        raise DatasetError(f"--model {absent}: no outcomes in {ds.root}; profile them first (icl-router profile)")
    rows = sorted(table.to_pylist(), key=lambda r: (r[schemas.MODEL_ID], order[r[schemas.QUERY_ID]]))
    out = pa.Table.from_pylist(rows, schema=table.schema)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, output)
    return {"output": str(output), "rows": len(out), "accuracy": {m: round(sum(r[schemas.CORRECT] for r in rows if r[schemas.MODEL_ID] == m)
                                                                       / max(1, sum(r[schemas.MODEL_ID] == m for r in rows)), 4) for m in models}}
