"""A local head + worker node (cluster/local/start.sh) with token auth; jobs reach it only via `icl-router submit`.

The head has no CPUs, so the embed actors run on the worker node while the driver runs on the
head: the job crosses nodes. Killing the worker's raylet mid-job, then starting a new worker
(what an autoscaler does), must end in a clear failure or in complete output, never in less.
`icl-router value` submitted to it writes what the same job writes locally.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from icl_router import schemas as S
from icl_router.config import AnchorsConfig, SplitConfig
from icl_router.data.anchors import run_anchors
from icl_router.data.dataset import Dataset
from icl_router.model.router_dir import load_router_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the tier marker comes from the directory (tests/conftest.py); each test here runs a minute or more

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "cluster" / "local"
BIN = Path(sys.executable).parent


def _free_base() -> int:
    from icl_router.testing import free_port_base

    return free_port_base(31000)


@pytest.fixture(scope="module")
def cluster():
    """env (with the token, no RAY_AUTH_MODE: submit must find and send the token itself) and the address."""
    temp_dir = tempfile.mkdtemp(prefix="icl-rc-", dir="/tmp")  # short: socket paths < 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}:{env['PATH']}",
        RAY=str(BIN / "ray"),
        ICL_RAY_TEMP_DIR=temp_dir,
        ICL_RAY_PORT_BASE=str(_free_base()),
        ICL_RAY_HEAD_CPUS="0",
        ICL_RAY_WORKER_CPUS="2",
        ICL_RAY_STOP_GRACE="10",
        RAY_AUTH_TOKEN=secrets.token_hex(16),  # this cluster's own token, not ~/.ray/auth_token
        TOKENIZERS_PARALLELISM="false",
    )
    try:
        out = subprocess.run([str(LOCAL / "start.sh")], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        address = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
        yield env, address, Path(temp_dir)
    finally:
        subprocess.run([str(LOCAL / "stop.sh")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(env, address, *args, job="embed", config="jobs/embed/config.yaml", timeout=240):
    cmd = [str(BIN / "icl-router"), "submit", job, "--address", address, "--config", config, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _client(env, address):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


def _queries(n: int) -> pa.Table:
    ids = [f"q{i:05d}" for i in range(n)]
    words = ["route", "model", "anchor", "profile", "vector", "query", "token", "cluster"]
    texts = [f"question {i}: " + " ".join(words[(i * k) % len(words)] for k in range(1, 12)) for i in range(n)]
    return pa.table({S.QUERY_ID: ids, S.TEXT: texts, S.TASK: ["mmlu"] * n, S.SPLIT: ["train"] * n})


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except psutil.Error:  # gone meanwhile
        return []


def test_submit_needs_the_token_then_runs_embed_across_nodes(cluster, small_dataset):
    env, address, _ = cluster
    ds = small_dataset

    wrong = _submit({**env, "RAY_AUTH_TOKEN": "not-the-token"}, address, f"dataset={ds.root}", timeout=120)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr[-2000:]
    assert f"icl-router submit: could not submit to {address}: Authentication failed" in wrong.stderr

    done = _submit(env, address, f"dataset={ds.root}", "num_actors=1", "batch_size=16")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED" and result["job_id"].startswith("raysubmit_")
    assert "embed: wrote 60 384-d embeddings" in done.stdout  # the job's logs were streamed

    want = sorted(ds.read_queries().column(S.QUERY_ID).to_pylist())
    got = ds.read_embeddings("all-MiniLM-L6-v2")
    assert sorted(got.column(S.QUERY_ID).to_pylist()) == want
    emb = np.stack(got.column(S.EMBEDDING).to_numpy(zero_copy_only=False))  # [60, 384]
    assert emb.shape == (60, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)

    # then a short stage-2 training run on the worker node: 2 Ray Train workers, DeepSpeed ZeRO-2
    run_anchors(AnchorsConfig(dataset=str(ds.root), k=6, split=SplitConfig(name="given")))
    out = ds.root.parent / "router"
    tiny = "{hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 64, vocab_size: 800}"
    trained = _submit(
        env, address, f"dataset={ds.root}", f"output={out}", "init_from=null", "split.name=given", f"router.tiny={tiny}",
        "max_steps=3", "checkpoint_every=3", "batch_size=8", "scaling.num_workers=2",
        job="train", config="jobs/train-stage2/config.yaml", timeout=400,
    )
    assert trained.returncode == 0, trained.stderr[-3000:] + trained.stdout[-3000:]
    assert "[train] stage 2 step 3/3" in trained.stdout  # progress streamed from the workers
    loaded = load_router_dir(out)
    assert loaded.meta.extra["steps"] == 3 and sorted(loaded.pool) == sorted(ds.model_ids())


def test_a_failing_job_exits_nonzero_with_its_message(cluster, tmp_path):
    env, address, _ = cluster
    out = _submit(env, address, f"dataset={tmp_path / 'absent'}", timeout=120)
    assert out.returncode == 1
    assert "FAILED" in out.stderr and "is not a dataset" in out.stderr, out.stderr[-2000:]

    # Ray's own CLI: the same job, which sends the token only with RAY_AUTH_MODE=token.
    entry = ["icl-router", "embed", "--config", "jobs/embed/config.yaml", f"dataset={tmp_path / 'absent'}"]
    ray_cli = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--", *entry]
    no_mode = subprocess.run(ray_cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert no_mode.returncode != 0 and "Authentication required" in no_mode.stderr, no_mode.stderr[-2000:]
    token = subprocess.run(ray_cli, cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert token.returncode == 1 and "is not a dataset" in token.stdout + token.stderr, token.stderr[-2000:]


VALUE_ROW_KEYS = {"model", "gain", "traffic_share", "cost_change"}


def _value_result(path: Path) -> dict:
    result = json.loads((path / "value.json").read_text())
    for key in ("candidates", "removals"):
        assert all(set(r) == VALUE_ROW_KEYS for r in result[key])
        assert [r["gain"] for r in result[key]] == sorted((r["gain"] for r in result[key]), reverse=True)
    assert sorted(r["model"] for r in result["candidates"]) == ["m-best", "m-strong"]
    assert (path / "value.md").is_file() and (path / "value.png").read_bytes()[:4] == b"\x89PNG"
    return result


def test_value_runs_locally_and_as_a_submitted_ray_job(cluster, value_setup, tmp_path):
    """``icl-router value`` run locally, then submitted through ``icl-router submit``: both write the same value.json."""
    env, address, _ = cluster
    ds, router, _ = value_setup
    costs = "{m-weak: 0.001, m-mid: 0.002, m-strong: 0.004, m-best: 0.01}"
    over = [f"router={router}", f"dataset={ds.root}", "pool=null", "candidates=[{name: m-strong}, {name: m-best}]", "evaluation.split=null", f"costs={costs}"]
    plain = {k: v for k, v in env.items() if not k.startswith("RAY")}
    local = subprocess.run([str(BIN / "icl-router"), "value", "--config", "jobs/value/config.yaml", *over, f"output={tmp_path / 'local'}"],
                           cwd=REPO, env=plain, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr[-3000:]
    assert "[value " in local.stderr and "scored 48/48 queries x 4 models" in local.stderr  # progress on stderr
    here = _value_result(tmp_path / "local")
    job = _submit(env, address, *over, f"output={tmp_path / 'job'}", job="value", config="jobs/value/config.yaml", timeout=180)
    assert job.returncode == 0, job.stderr[-3000:] + job.stdout[-3000:]
    assert json.loads(job.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    assert "scored 48/48 queries x 4 models" in job.stdout  # the job's stderr, streamed back
    there = _value_result(tmp_path / "job")
    for key in ("candidates", "removals"):
        assert [r["model"] for r in there[key]] == [r["model"] for r in here[key]]
        for a, b in zip(there[key], here[key]):
            assert a["gain"] == pytest.approx(b["gain"], abs=1e-3) and a["traffic_share"] == pytest.approx(b["traffic_share"], abs=1e-3)


def test_killing_the_worker_mid_job_fails_clearly_or_completes(cluster, tmp_path):
    import psutil

    env, address, temp_dir = cluster
    n = 300
    ds = Dataset(tmp_path / "big")
    ds.write_queries(_queries(n))

    out = _submit(env, address, f"dataset={ds.root}", "num_actors=1", "batch_size=8", "--no-wait")
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = json.loads(out.stdout.strip().splitlines()[-1])["job_id"]
    client = _client(env, address)

    # Wait until the embed actor lives on the worker node (loading its model or embedding), then kill the node.
    worker = psutil.Process(int((temp_dir / "worker.pid").read_text()))
    deadline = time.monotonic() + 120
    while not any("MapWorker" in " ".join(_cmdline(p)) for p in worker.children(recursive=True)):
        assert client.get_job_status(job_id).value in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
        assert time.monotonic() < deadline, "the embed actor never started on the worker node"
        time.sleep(0.5)
    (raylet,) = [p for p in worker.children(recursive=True) if p.name() == "raylet"]
    raylet.send_signal(signal.SIGKILL)
    assert client.get_job_status(job_id).value == "RUNNING", "the job ended before the node died: nothing was tested"
    worker.wait(timeout=60)  # its `ray start --block` parent stops the node's other processes, then exits

    # A new worker node, as an autoscaler would start one.
    again = subprocess.run([str(LOCAL / "start.sh"), "worker"], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]

    deadline = time.monotonic() + 180
    while (status := client.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {status} 180 s after the node died"
        time.sleep(2)
    got = ds.read_embeddings("all-MiniLM-L6-v2").column(S.QUERY_ID).to_pylist()
    if status == "SUCCEEDED":  # retried on the new node: every query embedded exactly once
        assert sorted(got) == [f"q{i:05d}" for i in range(n)]
    else:  # a clear failure, and nothing half-written
        assert client.get_job_info(job_id).message, "a failed job must say why"
        assert got == []
    print(f"worker killed mid-job: {status}")
