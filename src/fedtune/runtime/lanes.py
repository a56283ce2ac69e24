"""Parallel lanes for the in-process runtime: forked processes that share one copy of the base model.

Each lane is a child forked from the process that built the client handler, so every lane reads
the same physical pages of the base weights (copy-on-write: training writes only adapters,
optimizer state and activations, each lane its own). A lane runs torch with one thread: GNU OpenMP
(what the CPU wheels of torch use) hangs in a forked child that opens a parallel region after its
parent has used one, and on a small model two 1-thread processes also use two cores better than
one 2-thread process (benchmarks/README.md, "Runtimes"). Each lane has its own torch RNG, so a
client's seeded randomness does not depend on what the other lanes do: a client's reply is
bit-identical to the one a single 1-thread process gives it (``runtime.lanes=1,
runtime.torch_threads=1``).

Jobs and replies cross a pipe as plain pickles (the handler's bytes plus its client state). A lane
that dies or misses the round deadline costs its client the round's reply and is forked anew; an
exception in the handler is raised here, as it would be were the client served in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
import warnings
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from fedtune.core.types import ClientState
from fedtune.reporting.console import silence_bars
from fedtune.runtime.base import Affinity, Handle

log = logging.getLogger(__name__)

Job = tuple[int, bytes, ClientState]  # (client id, request, client state)


class LaneError(RuntimeError):
    """A client's handler raised in a lane and the exception could not be carried back as itself."""


def _serve(conn: Connection, handle: Handle, inherited: list[Connection], parent: int) -> None:
    """A lane's loop: run each job it is sent, reply with the result or the exception."""
    for c in inherited:  # the parent's ends of every lane's pipe: held here, they would hide the parent's exit
        c.close()
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the lanes
    torch.set_num_threads(1)
    silence_bars()  # lanes train at once: one client bar each would garble the terminal
    while True:
        try:
            job = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        cid, payload, state = pickle.loads(job)
        try:
            reply: tuple[str, Any] = ("ok", handle(cid, payload, state))
        except BaseException as exc:  # everything goes back to the parent, which decides
            reply = ("error", (_picklable(exc), traceback.format_exc()))
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this lane when its parent dies, even mid-training (else it ends at EOF)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def _picklable(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


class Lane:
    """One forked child and the parent's end of its pipe."""

    def __init__(self, handle: Handle, others: Sequence[Lane] = ()):
        """``others``: the pool's other lanes, whose pipe ends the child must not keep open."""
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        # the child's garbage collector would otherwise write to (and so copy) every page of Python objects
        gc.freeze()
        try:
            with warnings.catch_warnings():  # Python 3.12 warns on fork with threads: torch's idle pool holds no lock
                warnings.filterwarnings("ignore", ".*fork\\(\\) may lead to deadlocks", DeprecationWarning)
                inherited = [self.conn, *(lane.conn for lane in others)]
                self.process = ctx.Process(
                    target=_serve, args=(child, handle, inherited, os.getpid()), daemon=True, name="fedtune-lane"
                )
                self.process.start()
        finally:
            gc.unfreeze()
        child.close()
        self.job: Job | None = None

    def submit(self, job: Job) -> None:
        self.job = job
        self.conn.send_bytes(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))

    def stop(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


class LanePool:
    """``lanes`` forked children serving ``handle``; a job goes to the lane that served its client last when that
    one is free, else to whichever lane is (``base.Affinity``)."""

    def __init__(self, handle: Handle, lanes: int, timeout_s: float | None = None):
        self.handle, self.timeout = handle, timeout_s
        self.lanes: list[Lane] = []
        self.size = lanes
        self.affinity = Affinity()

    def run(self, jobs: Sequence[Job]) -> dict[int, tuple[bytes, ClientState]]:
        """Serve every job; client id -> (reply, state) for each that came back (dropped ones are absent)."""
        while len(self.lanes) < self.size:  # forked on first use: the handler is complete by then
            self.lanes.append(Lane(self.handle, self.lanes))
        pending, idle = deque(jobs), list(self.lanes)
        busy: dict[Connection, Lane] = {}
        done: dict[int, tuple[bytes, ClientState]] = {}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while pending or busy:
            while pending and idle:
                job = pending.popleft()
                lane = self.affinity.pick(job[0], idle, (j[0] for j in pending))
                lane.submit(job)
                self.affinity.served(job[0], lane)
                busy[lane.conn] = lane
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(busy), timeout=left)
            if not ready:  # the deadline passed with lanes still training
                for lane in busy.values():
                    cid = lane.job[0]
                    log.warning("client %d missed the %.0fs round deadline; restarting its lane", cid, self.timeout)
                    self._replace(lane)
                break
            for conn in ready:
                lane = busy.pop(conn)
                cid = lane.job[0]
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    lane.process.join(timeout=5)
                    code = lane.process.exitcode
                    log.warning("client %d: its lane died (exit code %s); forking a new one", cid, code)
                    idle.append(self._replace(lane))
                    continue
                if status == "error":
                    self.close()
                    exc, tb = value
                    if exc is None or not hasattr(exc, "add_note"):  # unpicklable, or Python 3.10
                        raise LaneError(f"client {cid} failed in a lane:\n{tb}")
                    exc.add_note(f"raised in a lane (pid {lane.process.pid}) serving client {cid}:\n{tb}")
                    raise exc
                done[cid] = value
                idle.append(lane)
        return done

    def _replace(self, lane: Lane) -> Lane:
        lane.stop()
        fresh = Lane(self.handle, [other for other in self.lanes if other is not lane])
        self.lanes[self.lanes.index(lane)] = fresh
        return fresh

    def close(self) -> None:
        for lane in self.lanes:
            lane.stop()
        self.lanes = []
