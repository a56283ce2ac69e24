"""In-process lanes: forked children serving clients at once, one torch thread each, sharing this process's memory."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
import torch

from fedtune.assembly import placement_of
from fedtune.config import ExperimentConfig
from fedtune.core.errors import ConfigError
from fedtune.core.types import Envelope
from fedtune.models.placement import available_cores
from fedtune.runtime.in_process import InProcessRuntime

BIG = torch.ones(64 * 2**20 // 4)  # 64 MB the lanes read and must not copy


def _private_mb() -> float:
    """This process's private (not shared) resident memory, MB."""
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def echo(cid: int, payload: bytes, state: dict) -> tuple[bytes, dict]:
    """Replies (client id, payload, pid, torch threads, private MB gained by reading BIG, BIG's sum); counts calls.

    b"crash" kills the lane, b"hang" sleeps past any test deadline, b"raise" raises in the handler."""
    if payload == b"crash":
        os._exit(3)
    if payload == b"hang":
        time.sleep(60)
    if payload == b"raise":
        raise KeyError(f"client {cid} asked to fail")
    before = _private_mb()
    total = float(BIG.sum())  # touches every page of the parent's tensor
    gained = _private_mb() - before
    calls = int(state["echo"]["calls"]) + 1 if state else 1
    reply = f"{cid}:{payload.decode()}:{os.getpid()}:{torch.get_num_threads()}:{gained:.0f}:{total:.0f}"
    return reply.encode(), {"echo": {"calls": torch.tensor(calls)}}


def _replies(rt: InProcessRuntime, payloads: dict[int, bytes]) -> dict[int, list[str]]:
    out = rt.send_and_receive([Envelope(c, p) for c, p in payloads.items()])
    return {e.client_id: e.payload.decode().split(":") for e in out}


def test_lanes_serve_every_client_at_once_on_one_thread_each_and_the_runtime_keeps_their_state():
    rt = InProcessRuntime(echo, lanes=2)
    try:
        for r in (1, 2, 3):
            got = _replies(rt, {c: f"r{r}".encode() for c in range(5)})
            assert list(got) == list(range(5))  # replies in the order asked
            assert all(v[1] == f"r{r}" and v[3] == "1" for v in got.values())
            pids = {v[2] for v in got.values()}
            assert len(pids) == 2 and str(os.getpid()) not in pids
        assert {c: int(s["echo"]["calls"]) for c, s in rt.client_states().items()} == dict.fromkeys(range(5), 3)
        assert torch.get_num_threads() == available_cores()  # this process's threads are untouched
    finally:
        rt.close()


def test_lanes_read_this_process_weights_without_copying_them():
    rt = InProcessRuntime(echo, lanes=2)
    try:
        got = _replies(rt, {0: b"a", 1: b"b"})
        assert all(float(v[5]) == BIG.numel() for v in got.values())  # each lane read all of BIG
        # reading 64 MB made a lane's private memory grow far less than 64 MB: the pages are this
        # process's (the lane's own baseline, interpreter pages touched since the fork, is not counted)
        assert all(float(v[4]) < 16 for v in got.values()), got
    finally:
        rt.close()


def test_a_crashed_lane_drops_only_its_client_and_is_forked_anew():
    rt = InProcessRuntime(echo, lanes=2)
    try:
        got = _replies(rt, {0: b"a", 1: b"crash", 2: b"b", 3: b"c"})
        assert sorted(got) == [0, 2, 3]
        assert 1 not in rt.client_states()  # no state invented for the dropped client
        got = _replies(rt, {c: b"next" for c in range(4)})
        assert sorted(got) == [0, 1, 2, 3]
        assert len({v[2] for v in got.values()}) == 2
    finally:
        rt.close()


def test_a_straggler_misses_the_deadline_and_the_lanes_recover():
    rt = InProcessRuntime(echo, lanes=2, timeout_s=3)
    try:
        t = time.monotonic()
        got = _replies(rt, {0: b"a", 1: b"hang", 2: b"b"})
        assert time.monotonic() - t < 20
        assert sorted(got) == [0, 2]
        assert sorted(_replies(rt, {0: b"x", 1: b"y", 2: b"z"})) == [0, 1, 2]
    finally:
        rt.close()


def test_an_exception_in_a_lane_is_raised_here_as_itself():
    rt = InProcessRuntime(echo, lanes=2)
    try:
        with pytest.raises(KeyError, match="client 1 asked to fail") as info:
            rt.send_and_receive([Envelope(0, b"a"), Envelope(1, b"raise")])
        assert any("serving client 1" in n for n in info.value.__notes__)
        assert sorted(_replies(rt, {0: b"a", 1: b"b"})) == [0, 1]  # the runtime still serves
    finally:
        rt.close()


def test_one_lane_serves_in_this_process_with_the_threads_asked_and_restores_them():
    rt = InProcessRuntime(echo, lanes=1, torch_threads=1)
    before = torch.get_num_threads()
    got = _replies(rt, {0: b"a", 1: b"b"})
    assert all(v[2] == str(os.getpid()) and v[3] == "1" for v in got.values())
    assert torch.get_num_threads() == before


def _cfg(**runtime) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"partition": {"num_clients": 6}, "runtime": runtime})


def lane_count(cfg: ExperimentConfig) -> int:
    return placement_of(cfg).lanes


def test_auto_lanes_are_one_per_core_at_most_one_per_client():
    assert lane_count(_cfg()) == min(available_cores(), 6)
    assert lane_count(ExperimentConfig.model_validate({"partition": {"num_clients": 1}})) == 1
    assert lane_count(_cfg(torch_threads=2)) == 1  # several threads per client: serial
    assert lane_count(_cfg(lanes=3)) == 3


@pytest.mark.parametrize(
    ("runtime", "match"),
    [({"lanes": 0}, "at least 1"), ({"lanes": 2, "torch_threads": 2}, "one torch thread")],
)
def test_lane_settings_that_cannot_work_are_refused(runtime, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        _cfg(**runtime)


ORPHAN = """
import os, sys, time
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.core.types import Envelope
rt = InProcessRuntime(lambda c, p, s: (str(os.getpid()).encode(), s), lanes=2)
print(" ".join(e.payload.decode() for e in rt.send_and_receive([Envelope(0, b""), Envelope(1, b"")])), flush=True)
time.sleep(60)
"""


def test_lanes_die_with_their_parent_and_release_its_output():
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True)
    lanes = [int(p) for p in proc.stdout.readline().split()]
    assert len(set(lanes)) == 2 and proc.pid not in lanes
    proc.kill()  # as a user's kill -9, or a test that kills a run mid-round
    proc.wait()
    t = time.monotonic()
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready and proc.stdout.read() == ""  # EOF: no lane holds the output pipe open
    while any(_alive(p) for p in lanes) and time.monotonic() - t < 10:
        time.sleep(0.1)
    assert not any(_alive(p) for p in lanes)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
