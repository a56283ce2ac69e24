"""Running a model's program (a code task's candidate) where it can harm nothing, and pass@k over the results.

Each candidate runs in a fresh process started by ``sandbox_boot.py``: no network (a network namespace
with no interface up), its own process tree (a PID namespace: everything it starts dies with it),
as ``nobody`` where fedtune runs as root, in a temporary directory that is deleted afterwards, under
limits on CPU time, address space, processes, file size and open files, and a wall-clock timeout
after which its whole process group is killed. A candidate that loops, forks without end, fills the
disk, allocates without end, deletes files or opens a connection fails, and only itself.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BOOT = Path(__file__).with_name("sandbox_boot.py")
NOT_SET_UP = 125  # sandbox_boot's exit code when it could not isolate the program
OUTPUT_BYTES = 64 * 2**10  # what is kept of a candidate's stderr, for its reason


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate a program (no network or PID namespaces for this user)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 * 2**30  # address space
    processes: int = 16
    file_bytes: int = 16 * 2**20  # the largest file it may write


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", or why not: the error's last line, "timed out", an exit code


def run(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source: a candidate followed by its tests) in the sandbox; passed if it exits 0."""
    folder = Path(tempfile.mkdtemp(prefix="fedtune-sandbox-", dir=_scratch_root()))
    try:
        (folder / "candidate.py").write_text(program)
        if os.geteuid() == 0:  # the program runs as nobody: its folder is the one place it may write
            os.chown(folder, 65534, 65534)
        os.chmod(folder, 0o700)
        cmd = [sys.executable, "-I", "-S", str(BOOT), _interpreter(), str(folder)]
        cmd += [str(v) for v in (limits.cpu_s, limits.memory_bytes, limits.processes, limits.file_bytes)]
        proc = subprocess.Popen(
            cmd,
            cwd=folder,
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            return Outcome(False, f"timed out after {limits.timeout_s:g}s")
        finally:
            _kill(proc)
        text = err[-OUTPUT_BYTES:].decode(errors="replace").strip()
        if proc.returncode == NOT_SET_UP and text.startswith("sandbox:"):
            raise SandboxUnavailable(text)
        if proc.returncode == 0:
            return Outcome(True, "passed")
        last = text.splitlines()[-1][:300] if text else ""
        return Outcome(False, last or _exit_reason(proc.returncode))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _interpreter() -> str:
    """A Python the candidate's user may run: this one's base interpreter, or (run as root, where that one
    lies where ``nobody`` cannot reach, e.g. under /root) the system's. SandboxUnavailable if none."""
    own = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return own
    found = [own] + [os.path.realpath(p) for p in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")]
    for python in found:
        if os.path.isfile(python) and _reachable_by_all(Path(python)):
            return python
    raise SandboxUnavailable(
        f"no Python that the user nobody may run (tried {', '.join(found)}): code runs as nobody when fedtune runs "
        "as root; install a system python3, or run fedtune as an ordinary user"
    )


def _scratch_root() -> str | None:
    """Where candidates' folders go: the temporary folder, or /tmp where that one is out of ``nobody``'s reach
    (a candidate runs as nobody when fedtune runs as root)."""
    if os.geteuid() != 0 or _reachable_by_all(Path(tempfile.gettempdir())):
        return None
    if _reachable_by_all(Path("/tmp")):
        return "/tmp"
    raise SandboxUnavailable(f"{tempfile.gettempdir()} and /tmp are out of reach of the user nobody; set TMPDIR")


def _reachable_by_all(path: Path) -> bool:
    """Whether every user may reach ``path``: each folder above it and itself searchable (or runnable) by others."""
    return all(os.stat(p).st_mode & 0o001 for p in [*path.parents, path])


def _kill(proc: subprocess.Popen) -> None:
    """Kill the candidate's process group (its PID namespace dies with its first process)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)


def _exit_reason(code: int) -> str:
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(code - 128).name}"
    return f"exit code {code}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), as a product (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@functools.cache
def check_available() -> None:
    """SandboxUnavailable (naming why) unless a trivial program runs in the sandbox here; checked once."""
    outcome = run("pass", Limits(timeout_s=60))
    if not outcome.passed:
        raise SandboxUnavailable(f"the sandbox cannot run even an empty program here: {outcome.reason}")
