"""``icl-router value`` end to end: run locally, then submitted to a local Ray cluster (head + worker,
token auth) through ``icl-router submit``; both write the same value.json."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the tier marker comes from the directory (tests/conftest.py); about a minute and a half

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROW_KEYS = {"model", "gain", "traffic_share", "cost_change"}


def _free_base() -> int:
    from icl_router.testing import free_port_base

    return free_port_base(41000)


def _check(path: Path) -> dict:
    result = json.loads((path / "value.json").read_text())
    for key in ("candidates", "removals"):
        assert all(set(r) == ROW_KEYS for r in result[key])
        assert [r["gain"] for r in result[key]] == sorted((r["gain"] for r in result[key]), reverse=True)
    assert sorted(r["model"] for r in result["candidates"]) == ["m-best", "m-strong"]
    assert (path / "value.md").is_file() and (path / "value.png").read_bytes()[:4] == b"\x89PNG"
    return result


def test_value_runs_locally_and_as_a_submitted_ray_job(value_setup, tmp_path):
    ds, router, _ = value_setup
    costs = "{m-weak: 0.001, m-mid: 0.002, m-strong: 0.004, m-best: 0.01}"
    over = [f"router={router}", f"dataset={ds.root}", "pool=null", "candidates=[{name: m-strong}, {name: m-best}]", "evaluation.split=null", f"costs={costs}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}:{env['PATH']}", TOKENIZERS_PARALLELISM="false")

    local = subprocess.run(
        [str(BIN / "icl-router"), "value", "--config", "jobs/value/config.yaml", *over, f"output={tmp_path / 'local'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert "[value " in local.stderr and "scored 48/48 queries x 4 models" in local.stderr  # progress on stderr
    here = _check(tmp_path / "local")

    temp_dir = tempfile.mkdtemp(prefix="icl-rv-", dir="/tmp")  # short: socket paths < 107 bytes
    cluster = {
        **env,
        "RAY": str(BIN / "ray"),
        "ICL_RAY_TEMP_DIR": temp_dir,
        "ICL_RAY_PORT_BASE": str(_free_base()),
        "ICL_RAY_HEAD_CPUS": "1",
        "ICL_RAY_WORKER_CPUS": "1",
        "ICL_RAY_STOP_GRACE": "10",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    try:
        up = subprocess.run([str(REPO / "cluster" / "local" / "start.sh")], env={**cluster, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=200)
        assert up.returncode == 0, up.stderr[-3000:]
        address = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
        cmd = [str(BIN / "icl-router"), "submit", "value", "--address", address, "--config", "jobs/value/config.yaml", *over, f"output={tmp_path / 'job'}"]
        job = subprocess.run(cmd, cwd=REPO, env=cluster, capture_output=True, text=True, timeout=180)
        assert job.returncode == 0, job.stderr[-3000:] + job.stdout[-3000:]
        assert json.loads(job.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"
        assert "scored 48/48 queries x 4 models" in job.stdout  # the job's stderr, streamed back
    finally:
        subprocess.run([str(REPO / "cluster" / "local" / "stop.sh")], env=cluster, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
    there = _check(tmp_path / "job")
    for key in ("candidates", "removals"):
        assert [r["model"] for r in there[key]] == [r["model"] for r in here[key]]
        for a, b in zip(there[key], here[key]):
            assert a["gain"] == pytest.approx(b["gain"], abs=1e-3) and a["traffic_share"] == pytest.approx(b["traffic_share"], abs=1e-3)
