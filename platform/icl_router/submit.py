"""Submit a job to a Ray cluster through the Jobs API, stream its logs, exit with its status.

``icl-router submit JOB --address URL --config PATH [key=value ...]`` runs
``icl-router JOB --config PATH [key=value ...]`` on the cluster, the same as
``ray job submit --working-dir . -- icl-router JOB ...``.

Token authentication (Ray 2.60 turns it on for clusters that have a token):
the token is read from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token, and sent as ``Authorization: Bearer`` (RAY_AUTH_MODE=disabled
sends none). Plain ``ray job submit`` also needs RAY_AUTH_MODE=token set.

Paths: the job runs in a copy of --working-dir without .git/, .venv/, runs/
and .gitignore'd files, so a relative config path into those (e.g. the
default ``dataset: runs/demo/data``) or out of it (``../shared/data``) would be missing there, and anything
written below the copy is lost when the job ends. Such paths are refused:
pass absolute paths the cluster sees (``dataset=/mnt/shared/data``), or
--shared-fs when the cluster shares this machine's filesystem (the local
cluster of cluster/local/), which makes them absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from icl_router import config as config_mod
from icl_router.config import ConfigError, load_config

# Never uploaded with the working dir (Ray also skips what .gitignore / .rayignore list).
EXCLUDES = [".git", ".venv", "runs"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The cluster could not be reached, refused the job, or the job did not succeed."""


def auth_headers() -> dict[str, str]:
    """The bearer token Ray's own clients would send, found the way Ray finds it."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        given = os.environ.get("RAY_AUTH_TOKEN_PATH")
        path = Path(given) if given else Path.home() / ".ray" / "auth_token"
        if path.is_file():
            token = path.read_text().strip()
        elif given:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={given} is not a file; point it at the cluster's token file")
    return {"Authorization": f"Bearer {token}"} if token else {}


def excluded_paths(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every relative path in a config into a folder never uploaded, or out of the working dir."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += excluded_paths(value, f"{prefix}{key}.")
        elif isinstance(value, str) and "://" not in value and not value.startswith(("/", "~")):
            if Path(value).parts[:1] and Path(value).parts[0] in [*EXCLUDES, ".."]:
                found.append((f"{prefix}{key}", value))
    return found


def submit_job(
    job: str,
    config: str,
    overrides: list[str] | None = None,
    *,
    address: str,
    config_class: str | None = None,
    working_dir: str = ".",
    shared_fs: bool = False,
    wait: bool = True,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Submit ``icl-router JOB --config CONFIG [overrides]``; with ``wait``, stream logs until it ends.

    ``config_class`` (a class name in icl_router.config) loads the config here first, so a bad
    config fails before anything is uploaded. Raises SubmitError unless the job SUCCEEDED.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    wd = Path(working_dir).resolve()
    entrypoint = job_entrypoint(job, config, list(overrides or []), wd=wd, config_class=config_class, shared_fs=shared_fs)
    try:
        client = JobSubmissionClient(address, headers=auth_headers())
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(wd), "excludes": EXCLUDES},
            metadata={"job": job},
        )
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"could not submit to {address}: {e}") from None
    print(f"submit: {job} is {job_id} on {address}: {entrypoint}", file=sys.stderr, flush=True)
    if not wait:
        return {"job_id": job_id, "status": "PENDING", "entrypoint": entrypoint}
    return follow_job(client, job_id, job=job, entrypoint=entrypoint, timeout_s=timeout_s)


def job_entrypoint(job: str, config: str, overrides: list[str], *, wd: Path, config_class: str | None, shared_fs: bool) -> str:
    """The job's command line, relative to the working dir ``wd``; with ``config_class`` the config is
    loaded first, and its relative paths into what is not uploaded fail (or, with ``shared_fs``, become absolute)."""
    cfg_path = Path(config).resolve()
    if not cfg_path.is_relative_to(wd) or cfg_path.relative_to(wd).parts[0] in EXCLUDES:
        raise ConfigError(
            f"config {config} is not uploaded with --working-dir {wd} (outside it, or in one of {EXCLUDES}); "
            f"put it inside the working dir, e.g. under jobs/{job}/"
        )
    if config_class is not None:
        cfg = load_config(getattr(config_mod, config_class), cfg_path, overrides)
        bad = excluded_paths(cfg.model_dump(mode="json"))
        if bad and not shared_fs:
            listed = ", ".join(f"{k}={v}" for k, v in bad)
            raise ConfigError(
                f"{listed}: relative path(s) into {'/, '.join(EXCLUDES)}/ or ../, which are not uploaded to the cluster "
                f"(the job would miss its input or lose its output); pass absolute paths the cluster sees, "
                f"e.g. {bad[0][0]}=/mnt/shared/{bad[0][1]}, or --shared-fs if the cluster shares this filesystem"
            )
        overrides = [*overrides, *(f"{k}={wd / v}" for k, v in bad)]
    return shlex.join(["icl-router", job, "--config", str(cfg_path.relative_to(wd)), *overrides])


def follow_job(client: Any, job_id: str, *, job: str, entrypoint: str, timeout_s: float | None) -> dict[str, Any]:
    """Stream the job's logs until it ends; its result, or SubmitError unless it SUCCEEDED."""
    t0 = time.monotonic()

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(asyncio.wait_for(stream(), timeout_s))
    except TimeoutError:
        client.stop_job(job_id)
        raise SubmitError(f"job {job_id} did not end within {timeout_s:.0f} s; stopped it") from None
    except RuntimeError as e:  # the log stream broke off (e.g. the head restarted): the status below decides
        print(f"submit: log stream of {job_id} ended early: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        raise SubmitError(f"stopped following {job_id}; it keeps running (ray job stop {job_id} to end it)") from None

    # The stream closes as the job ends; the status may lag behind by a moment.
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise SubmitError(f"job {job_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(0.5)
    result = {"job_id": job_id, "status": status, "seconds": round(time.monotonic() - t0, 1), "entrypoint": entrypoint}
    if status != "SUCCEEDED":
        lines = (client.get_job_info(job_id).message or "no message").strip().splitlines()
        if len(lines) > 12:  # Ray appends the log tail, already streamed above
            lines = [*lines[:1], "...", *lines[-10:]]
        raise SubmitError(f"job {job_id} ({job}) {status}: " + "\n".join(lines))
    return result


def add_args(p: argparse.ArgumentParser, *, job_configs: dict[str, str]) -> None:
    """``job_configs``: command name -> its config class name, the jobs one may submit."""
    # One sub-command per job: argparse can then take overrides after the options.
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB", help=", ".join(sorted(job_configs)))
    for name, cls in sorted(job_configs.items()):
        jp = jobs.add_parser(name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        jp.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="job API URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
        jp.add_argument("--config", required=True, help="the job's YAML config, inside --working-dir")
        jp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
        jp.add_argument("--working-dir", default=".", help="uploaded to the cluster; the job runs in a copy of it (default: .)")
        jp.add_argument("--shared-fs", action="store_true", help="the cluster sees this filesystem: make relative paths into runs/ etc. absolute")
        jp.add_argument("--no-wait", dest="wait", action="store_false", help="return after submitting, print the job id")
        jp.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
        jp.set_defaults(config_class=cls)


def run(a: argparse.Namespace) -> dict[str, Any]:
    if not a.address:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return submit_job(
            a.job,
            a.config,
            a.overrides,
            address=a.address,
            config_class=a.config_class,
            working_dir=a.working_dir,
            shared_fs=a.shared_fs,
            wait=a.wait,
            timeout_s=a.timeout,
        )
    except SubmitError as e:
        print(f"icl-router submit: {e}", file=sys.stderr)
        raise SystemExit(1) from None
