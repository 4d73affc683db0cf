"""The sandbox contains hostile generated code: each hostile program would pass its test if it
escaped (it returns the right value after the attack), so a 0 score means it was stopped."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from icl_router.graders import grade
from icl_router.sandbox import isolation, run_code

REPO = Path(__file__).resolve().parents[2]
TEST = "assert answer() == 42\n"  # grade() then returns the verdict 1.0 or 0.0 exactly: == on it is exact
NAMESPACES = isolation().startswith("namespaces")
# The sandbox timeout for programs a test expects to end on their own (pass, or fail with their own
# error): generous, so a loaded machine cannot turn the expected ending into a timeout. Tests of the
# timeout itself use short ones.
FINISH_S = 60.0


def _program(attack: str) -> str:
    body = "\n".join("    " + line for line in attack.strip().splitlines())
    return f"def answer():\n{body}\n    return 42\n"


def _live_nobody_processes(wait_s: float = 30.0) -> list[int]:
    """Processes of the sandbox user that are not zombies, after they had ``wait_s`` to die."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and p.stat().st_uid == 65534 and ") Z " not in (p / "stat").read_text():
                    pids.append(int(p.name))
            except (FileNotFoundError, ProcessLookupError):
                pass
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def test_correct_program_passes():
    assert grade("code", _program("pass"), TEST, timeout_s=FINISH_S) == 1.0
    r = run_code("import os; print(os.getcwd(), sum(range(10)))", timeout_s=FINISH_S)
    assert r.ok and r.stdout.split()[1] == "45"


def test_wrong_program_fails():
    assert grade("code", "def answer():\n    return 41\n", TEST, timeout_s=3) == 0.0


def test_infinite_loop_is_killed_at_the_timeout():
    assert grade("code", _program("while True:\n    pass"), TEST, timeout_s=2) == 0.0
    r = run_code("while True: pass", timeout_s=1)
    assert r.timed_out and not r.ok  # the sandbox's own timeout ended it (the test's timeout bounds the wait)
    print(f"infinite loop stopped after {r.duration_s:.1f} s")


def test_fork_bomb_is_capped_and_leaves_nothing_behind():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert grade("code", _program(bomb), TEST, timeout_s=2) == 0.0
    if NAMESPACES:  # PID namespace: the kernel killed every forked process with PID 1
        assert _live_nobody_processes() == []


def test_process_that_leaves_its_group_is_killed_too():
    if not NAMESPACES:
        pytest.skip(f"needs the PID namespace; in effect: {isolation()}")
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent exits')"
    assert run_code(prog, timeout_s=FINISH_S).ok
    assert _live_nobody_processes() == []


def test_memory_hog_fails():
    assert grade("code", _program("x = bytearray(2 * 1024**3)"), TEST, timeout_s=3, memory_mb=256) == 0.0
    r = run_code("a = []\nwhile True:\n    a.append(bytearray(10**7))", timeout_s=FINISH_S, memory_mb=256)
    assert not r.ok and not r.timed_out and "MemoryError" in r.stderr


def test_network_is_unreachable_and_nothing_is_sent():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        attack = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')"
        assert grade("code", _program(attack), TEST, timeout_s=3) == 0.0
        r = run_code(attack, timeout_s=FINISH_S)
        # refused at once (no route, or the socket prelude), not left to run into its connect timeout
        assert not r.ok and not r.timed_out and "timed out" not in r.stderr, r.stderr[-500:]
        with pytest.raises(socket.timeout):
            server.accept()


def test_public_address_fails_without_leaving_the_machine():
    if not NAMESPACES:  # without a net namespace a bug here would really contact the host
        pytest.skip(f"needs the net namespace; in effect: {isolation()}")
    r = run_code("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", timeout_s=FINISH_S)
    assert not r.ok and "Network is unreachable" in r.stderr
    assert grade("code", _program("import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=1)"), TEST) == 0.0


@pytest.mark.parametrize("where", ["repo", "tmp"])
def test_writes_outside_the_work_dir_fail_and_leave_no_file(where):
    target = (REPO if where == "repo" else Path("/tmp")) / f"sandbox-escape-{uuid.uuid4().hex}"
    try:
        assert grade("code", _program(f"open({str(target)!r}, 'w').write('x')"), TEST, timeout_s=3) == 0.0
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_work_dir_is_writable_and_fresh():
    prog = "import os\nprint(sorted(os.listdir('.')))\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())"
    r = run_code(prog, timeout_s=FINISH_S)
    assert r.ok, r.stderr
    assert r.stdout.splitlines() == ["['main.py']", "ok"]
    assert not os.path.exists("scratch.txt")


def test_output_is_capped():
    r = run_code("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)", timeout_s=FINISH_S)
    assert not r.ok and not r.timed_out and "File too large" in r.stderr
