"""Starts one untrusted program in its sandbox: ``python -I -S sandbox_boot.py DIR CPU MEM PROCS FSIZE CMD...``.

Standard library only, and nothing of fedtune's: it runs before the program, in a fresh process. It
leaves the network (a network namespace with no interface up) and the process tree (a PID namespace:
when the program's first process ends, the kernel kills every process it left), then in the
namespace's first process gives up root for ``nobody`` where it runs as root, sets the resource
limits, asks to be killed with this process, and replaces itself with ``CMD`` (run in DIR: an
interpreter ``nobody`` may run with the candidate's file, e.g. ``python -I -S candidate.py``, where the
standard library is all a candidate gets, or ``node candidate.js``, or a shell compiling and running it).
Exit code 125 and a line on stderr: the sandbox could not be set up (nothing of the program ran).
"""

import contextlib
import ctypes
import os
import resource
import signal
import sys

CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x40000000, 0x20000000, 0x10000000
PR_SET_PDEATHSIG = 1
NOBODY = 65534
NOT_SET_UP = 125


def main() -> int:
    folder = sys.argv[1]
    cpu_s, memory, processes, file_bytes = map(int, sys.argv[2:6])
    command = sys.argv[6:]
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    if not root:  # the limit counts every process of this user, the program's and the others it runs
        processes += processes_of(os.getuid())
    flags = CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        why = os.strerror(ctypes.get_errno())
        print(f"sandbox: cannot leave the network and process tree ({why})", file=sys.stderr)
        return NOT_SET_UP
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    try:
        if root:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        for limit, value in (
            (resource.RLIMIT_CPU, cpu_s),
            (resource.RLIMIT_AS, memory),
            (resource.RLIMIT_NPROC, processes),
            (resource.RLIMIT_FSIZE, file_bytes),
            (resource.RLIMIT_NOFILE, 64),
            (resource.RLIMIT_CORE, 0),
        ):
            resource.setrlimit(limit, (value, value))
        os.chdir(folder)
        os.execve(command[0], command, {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder})
    except Exception as exc:  # anything here means the program did not start
        print(f"sandbox: cannot start the program ({type(exc).__name__}: {exc})", file=sys.stderr)
        os._exit(NOT_SET_UP)
    return NOT_SET_UP


def processes_of(uid: int) -> int:
    """How many processes ``uid`` runs now."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                count += os.stat(f"/proc/{entry}").st_uid == uid
    return count


if __name__ == "__main__":
    sys.exit(main())
