"""Code candidates run where they harm nothing, and pass@k is the unbiased estimator.

Each hostile candidate (a loop, a fork bomb, deleting files outside its folder, a huge allocation,
filling the disk, a network connection) must end as a failed candidate, and what it aimed at must
be as it was.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from fedtune.evaluation import sandbox
from fedtune.evaluation.sandbox import Limits, pass_at_k, run
from fedtune.evaluation.sandbox_boot import processes_of

QUICK = Limits(timeout_s=5.0, cpu_s=5, memory_bytes=512 * 2**20, processes=8, file_bytes=2**20)
ROOT = os.geteuid() == 0


def _available() -> bool:
    try:
        return run("pass", QUICK).passed
    except sandbox.SandboxUnavailable:
        return False


pytestmark = pytest.mark.skipif(not _available(), reason="this machine cannot isolate a program (namespaces)")


def test_a_right_candidate_passes_and_a_wrong_one_fails_with_its_error():
    program = "def add(a, b):\n    return a + b\n"
    assert run(program + "assert add(2, 3) == 5\n", QUICK) == sandbox.Outcome(True, "passed")
    failed = run(program + "assert add(2, 3) == 6, 'add(2, 3)'\n", QUICK)
    assert not failed.passed and failed.reason == "AssertionError: add(2, 3)"
    assert not run("def f(:\n", QUICK).passed  # a syntax error is a failure, not a crash of ours


def test_an_endless_loop_times_out():
    started = time.monotonic()
    outcome = run("while True:\n    pass\n", Limits(timeout_s=1.0, cpu_s=30))
    assert not outcome.passed and "timed out" in outcome.reason
    assert time.monotonic() - started < 10


def test_a_fork_bomb_fails_and_leaves_no_process_behind():
    uid = 65534 if ROOT else os.getuid()
    before = processes_of(uid)
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    outcome = run(bomb, Limits(timeout_s=3.0, cpu_s=3, processes=8))
    assert not outcome.passed
    until = time.monotonic() + 10
    while processes_of(uid) > before and time.monotonic() < until:  # the kernel reaps the namespace's last
        time.sleep(0.05)
    assert processes_of(uid) <= before


@pytest.fixture
def public_folder():
    """A root-owned folder every user can reach (mode 755 under /tmp), as most of a machine's files are."""
    folder = Path(tempfile.mkdtemp(prefix="fedtune-canary-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="as an ordinary user a candidate keeps that user's file permissions")
def test_files_outside_its_folder_stay_as_they_were(public_folder):
    canary = public_folder / "canary.txt"
    canary.write_text("intact")
    canary.chmod(0o644)
    attack = (
        "import os, shutil\n"
        "done = []\n"
        f"for act in (lambda: os.remove({str(canary)!r}), lambda: shutil.rmtree({str(public_folder)!r}),\n"
        f"            lambda: open({str(canary)!r}, 'w').write('gone'),\n"
        f"            lambda: open({str(public_folder / 'new')!r}, 'w')):\n"
        "    try:\n        act()\n        done.append(act)\n    except OSError:\n        pass\n"
        f"assert open({str(canary)!r}).read() == 'intact'  # it could read it: the folder was reachable\n"
        "assert done, 'nothing was harmed'\n"
    )
    outcome = run(attack, QUICK)
    assert outcome == sandbox.Outcome(False, "AssertionError: nothing was harmed"), outcome
    assert canary.read_text() == "intact" and sorted(p.name for p in public_folder.iterdir()) == ["canary.txt"]


def test_a_huge_allocation_fails_here_only():
    outcome = run("block = bytearray(64 * 2**30)\n", QUICK)
    assert not outcome.passed and "MemoryError" in outcome.reason


def test_filling_the_disk_stops_at_the_file_limit():
    outcome = run("with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 2**20)\n", QUICK)
    assert not outcome.passed


def test_no_network_not_even_this_machines_loopback():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        listener.settimeout(0.5)
        outcome = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", QUICK)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody came
    assert not outcome.passed and "Network is unreachable" in outcome.reason, outcome


def test_its_folder_is_gone_afterwards(public_folder, monkeypatch):
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(public_folder))
    assert run("open('scratch', 'w').write('x')\n", QUICK).passed
    assert list(public_folder.iterdir()) == []


NODE, GXX = shutil.which("node", path="/usr/bin:/bin"), shutil.which("g++", path="/usr/bin:/bin")
SLOW_TOOLS = Limits(timeout_s=30.0, cpu_s=20, memory_bytes=2**30, processes=16, file_bytes=16 * 2**20)


@pytest.mark.skipif(NODE is None, reason="no node on this machine")
def test_javascript_candidates_run_on_node_and_fail_with_their_error(public_folder):
    program = "function add(a, b) { return a + b; }\nconst assert = require('node:assert');\n"
    assert run(program + "assert.deepEqual(add(2, 3), 5);\n", SLOW_TOOLS, "js").passed
    failed = run(program + "assert.deepEqual(add(2, 3), 6);\n", SLOW_TOOLS, "js")
    assert not failed.passed and "AssertionError" in failed.reason
    assert "timed out" in run("while (true) {}\n", Limits(timeout_s=1.0, cpu_s=30, memory_bytes=2**30), "js").reason
    if ROOT:  # as an ordinary user a candidate keeps that user's file permissions
        canary = public_folder / "canary.txt"
        canary.write_text("intact")
        remove = f"require('fs').rmSync({str(public_folder)!r}, {{recursive: true, force: true}});\n"
        assert not run(remove, SLOW_TOOLS, "js").passed and canary.read_text() == "intact"


@pytest.mark.skipif(GXX is None, reason="no g++ on this machine")
def test_cpp_candidates_compile_and_run_inside_the_sandbox():
    program = "#include<assert.h>\n#include<bits/stdc++.h>\nint add(int a, int b) { return a + b; }\n"
    assert run(program + "int main() { assert(add(2, 3) == 5); }\n", SLOW_TOOLS, "cpp").passed
    wrong = run(program + "int main() { assert(add(2, 3) == 6); }\n", SLOW_TOOLS, "cpp")
    assert not wrong.passed and "Assertion" in wrong.reason, wrong
    broken = run("int main() { return nope; }\n", SLOW_TOOLS, "cpp")
    assert not broken.passed and "error" in broken.reason and "nope" in broken.reason
    net = run(
        "#include<sys/socket.h>\n#include<netinet/in.h>\n#include<arpa/inet.h>\nint main() {\n"
        "  int s = socket(AF_INET, SOCK_STREAM, 0); sockaddr_in a{}; a.sin_family = AF_INET; a.sin_port = htons(80);\n"
        '  inet_pton(AF_INET, "1.1.1.1", &a.sin_addr); return connect(s, (sockaddr*)&a, sizeof a) == 0 ? 0 : 1; }\n',
        SLOW_TOOLS,
        "cpp",
    )
    assert not net.passed


def test_an_unknown_language_is_refused():
    with pytest.raises(ValueError, match="runs python, js, cpp"):
        run("x", QUICK, "ruby")


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 200])
def test_pass_at_k_is_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0


def test_pass_at_1_is_the_fraction_that_passed():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 0)
