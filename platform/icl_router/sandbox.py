"""Run untrusted generated code (HumanEval/MBPP programs) in a separate, fenced-off process.

Each program runs as ``python -I main.py`` under a small launcher. As root (the normal case
here) the launcher enters fresh network, PID and mount namespaces and drops to the ``nobody``
user before running the program:

- network: a new net namespace has only a downed loopback, so any connect fails at once
  (ENETUNREACH) without a packet leaving, to 127.0.0.1 as well as to public addresses;
- files: the working directory is a fresh size-capped tmpfs seen only by the program, and the
  only place it can write: /tmp, /var/tmp, /dev/shm and /run/lock are replaced by empty
  read-only mounts, everything else is root's and read-only to ``nobody`` (the project too);
- processes: RLIMIT_NPROC counts per user, and ``nobody`` runs nothing else, so a fork bomb
  hits the cap; the program is PID 1 of its namespace, so when it dies (or is killed at the
  wall-clock timeout) the kernel kills every process it left behind, even ones that left the
  process group;
- resources: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (also caps captured output);
- imports: the base interpreter runs, bound read-only into view, so programs get the standard
  library only (no venv packages: enough for HumanEval / MBPP).

Without root or namespaces (``isolation()`` says which) it falls back to rlimits, a fresh
temporary directory, a process-group kill and a socket-blocking prelude, which a determined
program can get around: use that mode only for trusted code.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
MAX_OUTPUT_BYTES = 1 << 20  # kept of stdout / stderr each

# Runs as the parent's user in the child; reads the program on stdin. argv[1] is a JSON config.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
src = sys.stdin.buffer.read()
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        sys.stderr.write("sandbox: %s failed: %s\n" % (what, os.strerror(ctypes.get_errno())))
        os._exit(125)
work = cfg["work"]
if cfg["namespaces"]:
    CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x20000000, 0x40000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 0x1000, 0x4000, 0x40000
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
    # private propagation first, or the tmpfs mounts would appear on the host
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    flags = MS_NOSUID | MS_NODEV
    for d in cfg["scratch"]:  # fresh and empty, read-only below: only the work dir is writable
        check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", flags, b"size=1m"), "mount tmpfs " + d)
    # the interpreter may live where nobody cannot reach it (pyenv under /root): bind it into view
    os.makedirs(cfg["python_view"])
    check(libc.mount(cfg["python_home"].encode(), cfg["python_view"].encode(), None, MS_BIND | MS_REC, None), "bind python")
    os.makedirs(work)
    opts = ("size=%dm,mode=1777" % cfg["tmpfs_mb"]).encode()
    check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", flags, opts), "mount tmpfs " + work)
    for d in cfg["scratch"]:
        check(libc.mount(None, d.encode(), None, MS_REMOUNT | MS_RDONLY | flags, None), "remount ro " + d)
    pid = os.fork()  # the child is PID 1 of the new PID namespace
    if pid:
        os.close(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):  # die the same way so the caller sees the signal
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status))
with open(os.path.join(work, "main.py"), "wb") as f:
    f.write(src)
if cfg["uid"] is not None:
    os.chown(work, cfg["uid"], cfg["gid"])
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
if cfg["namespaces"]:
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (after setuid, which clears it)
fd = os.open(os.devnull, os.O_RDONLY)
os.dup2(fd, 0)
os.chdir(work)
python = cfg["python"]
os.execve(python, [python, "-I", "main.py"], dict(os.environ, LD_LIBRARY_PATH=os.path.join(os.path.dirname(python), "..", "lib")))
"""

# Fallback only (no net namespace): refuse sockets at the Python level.
_NO_NET_PRELUDE = """\
import socket as _sandbox_socket
def _sandbox_no_net(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_sandbox_socket.socket.connect = _sandbox_socket.socket.connect_ex = _sandbox_no_net
_sandbox_socket.socket.sendto = _sandbox_socket.create_connection = _sandbox_no_net
del _sandbox_socket, _sandbox_no_net
"""


@dataclass
class SandboxResult:
    ok: bool  # exited 0 within the time limit
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    isolation: str


def _unprivileged_ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


@functools.cache
def _namespaces_work() -> bool:
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    probe = "import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare(0x20000|0x20000000|0x40000000) != 0)"
    return subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True).returncode == 0


def isolation() -> str:
    """Which containment is in effect, in words (for logs and bench reports)."""
    if _namespaces_work():
        user = "uid nobody" if _unprivileged_ids() else f"uid {os.geteuid()}"
        return f"namespaces net+pid+mount, tmpfs work dir (only writable place), {user}, rlimits AS/CPU/NPROC/FSIZE"
    return f"no namespaces: socket-blocking prelude, temp dir, process-group kill, uid {os.geteuid()}, rlimits AS/CPU/FSIZE"


def _read_capped(f) -> str:
    f.seek(0)
    return f.read(MAX_OUTPUT_BYTES).decode("utf-8", "replace")


def _launcher_config(namespaces: bool, work: str, *, timeout_s: float, memory_mb: int, cpu_s: int | None, max_procs: int, file_mb: int,
                     tmpfs_mb: int) -> dict:
    """What the launcher sets up before it runs the program: namespaces, the user, the limits, the views."""
    # the uid switch needs the namespaces too: they make the interpreter reachable for nobody
    ids = _unprivileged_ids() if namespaces else None
    limits = {
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_CPU": cpu_s or int(timeout_s) + 1,  # soft == hard: SIGKILL, which PID 1 cannot ignore
        "RLIMIT_FSIZE": file_mb << 20,
        "RLIMIT_CORE": 0,
    }
    if ids:  # NPROC is per user: only meaningful for a user that runs nothing else
        limits["RLIMIT_NPROC"] = max_procs
    python = os.path.realpath(sys.executable)
    python_view = "/tmp/.python"  # inside the private /tmp
    if namespaces:
        python = os.path.join(python_view, os.path.relpath(python, sys.base_prefix))
    return {
        "namespaces": namespaces,
        "python": python,
        "python_home": sys.base_prefix,
        "python_view": python_view,
        "scratch": [d for d in SCRATCH_DIRS if os.path.isdir(d)],
        "tmpfs_mb": tmpfs_mb,
        "work": work,
        "uid": ids[0] if ids else None,
        "gid": ids[1] if ids else None,
        "limits": limits,
    }


def run_code(
    program: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_s: int | None = None,
    max_procs: int = 64,
    file_mb: int = 16,
    tmpfs_mb: int = 64,
) -> SandboxResult:
    """Run ``program`` with ``python -I`` in the sandbox and report how it ended.

    ``max_procs`` caps the processes of the sandbox user, shared by sandboxes running at the
    same time; ``file_mb`` caps any file written, the captured output included.
    """
    namespaces = _namespaces_work()
    host_dir = None
    if namespaces:
        work = "/tmp/sandbox"  # inside the private, fresh /tmp
    else:
        host_dir = work = tempfile.mkdtemp(prefix="icl-sandbox-")
        program = _NO_NET_PRELUDE + program
    cfg = _launcher_config(namespaces, work, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s, max_procs=max_procs, file_mb=file_mb, tmpfs_mb=tmpfs_mb)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
    start = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            env=env,
            cwd="/",
            start_new_session=True,
        )
        try:
            proc.communicate(program.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        duration = time.monotonic() - start
        stdout, stderr = _read_capped(out), _read_capped(err)
    if host_dir:
        # a program may outlive its group by leaving it; it runs as nobody and cannot touch this
        shutil.rmtree(host_dir, ignore_errors=True)
    rc = proc.returncode
    return SandboxResult(
        ok=rc == 0 and not timed_out,
        returncode=rc,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        duration_s=duration,
        isolation=isolation(),
    )
