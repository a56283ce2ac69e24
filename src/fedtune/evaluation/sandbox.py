"""Running a model's program (a code task's candidate) where it can harm nothing, and pass@k over the results.

Each candidate runs in a fresh process started by ``sandbox_boot.py``: no network (a network namespace
with no interface up), its own process tree (a PID namespace: everything it starts dies with it),
as ``nobody`` where fedtune runs as root, in a temporary directory that is deleted afterwards, under
limits on CPU time, address space, processes, file size and open files, and a wall-clock timeout
after which its whole process group is killed. A candidate that loops, forks without end, fills the
disk, allocates without end, deletes files or opens a connection fails, and only itself. Python runs on
an interpreter with its standard library only; JavaScript on ``node``; C++ is compiled with ``g++
-std=c++17`` and run, both inside the sandbox (MultiPL-E's commands).
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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


LANGUAGES = ("python", "js", "cpp")


def run(program: str, limits: Limits = Limits(), language: str = "python") -> Outcome:
    """Run ``program`` (source in ``language``: a candidate followed by its tests) in the sandbox; passed if it
    exits 0 (C++: compiles, then its binary exits 0)."""
    command = _command(language)
    folder = Path(tempfile.mkdtemp(prefix="fedtune-sandbox-", dir=_scratch_root()))
    try:
        (folder / f"candidate.{'py' if language == 'python' else language}").write_text(program)
        if os.geteuid() == 0:  # the program runs as nobody: its folder is the one place it may write
            os.chown(folder, 65534, 65534)
        os.chmod(folder, 0o700)
        cmd = [sys.executable, "-I", "-S", str(BOOT), str(folder)]
        cmd += [str(v) for v in (limits.cpu_s, limits.memory_bytes, limits.processes, limits.file_bytes)]
        cmd += command
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
        return Outcome(False, _reason(text) or _exit_reason(proc.returncode))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_all(programs: Sequence[str], limits: Limits = Limits(), language: str = "python") -> list[Outcome]:
    """``run`` for each program, up to 4 at a time (each waits on its own process), in the programs' order."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda p: run(p, limits, language), programs))


def _command(language: str) -> list[str]:
    """What runs ``candidate.*`` in its folder, by absolute path; SandboxUnavailable if this machine lacks it."""
    if language == "python":
        return [_interpreter(), "-I", "-S", "candidate.py"]
    tool = {"js": "node", "cpp": "g++"}.get(language)
    if tool is None:
        raise ValueError(f"the sandbox runs {', '.join(LANGUAGES)}, not {language!r}")
    found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin")
    if found is None:
        raise SandboxUnavailable(f"{language} candidates need {tool} in /usr/local/bin, /usr/bin or /bin")
    if language == "js":
        return [found, "candidate.js"]
    return ["/bin/sh", "-c", f"{found} candidate.cpp -o candidate -std=c++17 && exec ./candidate"]


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


def _reason(stderr: str) -> str:
    """The line of a failed candidate's stderr that says why: the last naming an error, else the last."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if "error" in line.lower()]
    return (named or lines or [""])[-1][:300]


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


EMPTY = {"python": "pass", "js": "", "cpp": "int main() { return 0; }"}


@functools.cache
def check_available(language: str = "python") -> None:
    """SandboxUnavailable (naming why) unless a trivial ``language`` program runs in the sandbox here; checked
    once per language."""
    outcome = run(EMPTY[language], Limits(timeout_s=60, cpu_s=30), language)
    if not outcome.passed:
        raise SandboxUnavailable(f"the sandbox cannot run even an empty {language} program here: {outcome.reason}")
