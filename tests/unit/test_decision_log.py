"""The decision log: rows in, shards out, bounded; a failing disk never raises (serving/decision_log.py)."""

import errno
import logging

import pyarrow.parquet as pq
import pytest

from icl_router.serving import decision_log as dl

pytestmark = pytest.mark.unit


def row(i: int, **over) -> dict:
    r = {
        "request_id": f"req-{i}", "time": dl.now(), "query_hash": dl.query_hash(f"q{i}"), "query_text": None, "query_embedding": None,
        "task": "gsm8k" if i % 2 else None, "route": "routed", "kind": "chat", "models": ["a", "b"], "p": [0.6, 0.4],
        "evidence_mass": 1.5, "scored_by": "router", "layer": "plain", "chosen": "a", "default_model": "a", "policy": "highest",
        "order": ["a", "b"], "fallback": [], "model": "a", "status": "ok", "stream": False, "latency_ms": 12.5, "scoring_ms": 3.0,
        "prompt_tokens": 10, "completion_tokens": 5, "cost": 0.001, "key": "team-a", "pool_version": "e:1",
    }
    return {**r, **over}


def test_rows_round_trip_in_rotated_shards(tmp_path):
    log = dl.DecisionLog(tmp_path, shard_rows=3)
    for i in range(7):
        log.append(row(i))
        if log.due():
            log.flush()
    log.flush()
    shards = dl.shards(tmp_path)
    assert len(shards) == 3 and [pq.read_metadata(s).num_rows for s in shards] == [3, 3, 1]
    t = dl.read_log(tmp_path)
    assert t.schema.equals(dl.DECISION_SCHEMA, check_metadata=False)
    assert t.column("request_id").to_pylist() == [f"req-{i}" for i in range(7)]
    assert t.column("p").to_pylist()[0] == [0.6, 0.4] and log.written == 7 and log.dropped == 0
    assert not list((tmp_path / "decisions").glob(".*"))  # no temporary file left


def test_read_of_an_empty_log_has_the_schema(tmp_path):
    t = dl.read_log(tmp_path / "nothing", "feedback")
    assert t.num_rows == 0 and t.schema.names == dl.FEEDBACK_SCHEMA.names


def test_disk_is_bounded_by_deleting_the_oldest_shards(tmp_path):
    log = dl.DecisionLog(tmp_path, shard_rows=1)
    log.append(row(0))
    log.flush()
    one = dl.shards(tmp_path)[0].stat().st_size
    log.max_bytes = int(2.5 * one)
    for i in range(1, 6):
        log.append(row(i))
        log.flush()
    kept = dl.read_log(tmp_path).column("request_id").to_pylist()
    assert kept == ["req-4", "req-5"]


def test_unwritable_dir_drops_counts_and_warns_once(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    dropped = []
    log = dl.DecisionLog(blocker / "log", on_drop=dropped.append)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        for i in range(3):
            log.append(row(i))
            assert log.flush() == 0  # never raises
    assert log.dropped == 3 and sum(dropped) == 3 and log.written == 0
    assert sum("dropping rows" in r.getMessage() for r in caplog.records) == 1


def test_full_disk_then_recovery(tmp_path, monkeypatch, caplog):
    log = dl.DecisionLog(tmp_path)
    real = dl.pq.write_table

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl.pq, "write_table", full)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        log.append(row(0))
        log.flush()
        log.append(row(1))
        log.flush()
        monkeypatch.setattr(dl.pq, "write_table", real)
        log.append(row(2))
        assert log.flush() == 1
    assert log.dropped == 2 and dl.read_log(tmp_path).column("request_id").to_pylist() == ["req-2"]
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("dropping rows" in m for m in msgs) == 1 and any("writing again" in m for m in msgs)
    assert not list((tmp_path / "decisions").glob(".*"))


def test_the_buffer_never_grows_past_its_bound(tmp_path):
    log = dl.DecisionLog(tmp_path, shard_rows=2, max_buffer_rows=2)
    for i in range(5):
        log.append(row(i))
    assert len(log.rows) == 2 and log.dropped == 3


def test_a_row_the_schema_refuses_is_dropped_not_raised(tmp_path):
    log = dl.DecisionLog(tmp_path)
    log.append(row(0, p="not a list"))
    assert log.flush() == 0 and log.dropped == 1


def test_find_request_reads_the_shards(tmp_path):
    log = dl.DecisionLog(tmp_path)
    for i in range(3):
        log.append(row(i))
    log.flush()
    assert dl.find_request(tmp_path, "req-1")["chosen"] == "a"
    assert dl.find_request(tmp_path, "req-9") is None
    assert dl.find_request(tmp_path, "req-1", since=dl.now()) is None  # older than the window: expired


def test_feedback_shards_are_a_kind_of_their_own(tmp_path):
    fb = dl.DecisionLog(tmp_path, "feedback")
    fb.append({"request_id": "req-1", "time": dl.now(), "model": "a", "task": None, "correct": True, "score": None, "reference": None, "grader": None, "key": "k"})
    fb.flush()
    assert dl.read_log(tmp_path, "feedback").num_rows == 1 and dl.read_log(tmp_path).num_rows == 0
