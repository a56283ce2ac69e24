"""The Ray pool with real worker processes: scheduling, client state, crashes and the round deadline."""

from __future__ import annotations

import os
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from fedtune.config import ExperimentConfig  # noqa: E402
from fedtune.core.types import Envelope  # noqa: E402
from fedtune.runtime.ray_pool import RayRuntime  # noqa: E402
from fedtune.runtime.worker import ClientWorker  # noqa: E402


class EchoWorker:
    """Replies with (client id, payload, pid) and counts calls in the client state.

    Payload b"crash" kills the worker process; b"hang" sleeps past any test deadline.
    """

    def __init__(self, build, cwd, threads):
        self.threads = threads

    def handle(self, cid, payload, state):
        if payload == b"crash":
            os._exit(1)
        if payload == b"hang":
            time.sleep(60)
        calls = int(state["echo"]["calls"].item()) + 1 if "echo" in state else 1
        return f"{cid}:{payload.decode()}:{os.getpid()}:{self.threads}".encode(), {
            "echo": {"calls": torch.tensor(calls)}
        }

    def pid(self):
        return os.getpid()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _runtime(**federation) -> RayRuntime:
    cfg = ExperimentConfig.model_validate(
        {"partition": {"num_clients": 6}, "federation": federation, "runtime": {"name": "ray"}}
    )
    return RayRuntime(cfg.runtime.ray, cfg.federation.round_timeout_s, cfg.clients_per_round(), dict, EchoWorker)


def _replies(rt: RayRuntime, payloads: dict[int, bytes]) -> dict[int, list[str]]:
    out = rt.send_and_receive([Envelope(c, p) for c, p in payloads.items()])
    return {e.client_id: e.payload.decode().split(":") for e in out}


def test_pool_serves_every_client_on_few_workers_and_keeps_their_state(local_ray):
    rt = _runtime()
    try:
        assert rt.num_workers == 2  # one per CPU, fewer than the 6 clients
        for round_index in (1, 2, 3):
            got = _replies(rt, {c: f"r{round_index}".encode() for c in range(6)})
            assert sorted(got) == list(range(6))
            assert all(v[1] == f"r{round_index}" and v[3] == "1" for v in got.values())
            assert len({v[2] for v in got.values()}) <= 2  # at most two worker processes did the work
        assert {c: int(s["echo"]["calls"]) for c, s in rt.client_states().items()} == dict.fromkeys(range(6), 3)
    finally:
        rt.close()


def test_a_crashed_worker_drops_only_its_client_and_is_replaced(local_ray):
    rt = _runtime()
    try:
        got = _replies(rt, {0: b"a", 1: b"crash", 2: b"b", 3: b"c"})
        assert sorted(got) == [0, 2, 3]
        assert "1" not in {str(c) for c in rt.client_states()}  # no state invented for the dropped client
        got = _replies(rt, {c: b"next" for c in range(4)})  # the client comes back next round
        assert sorted(got) == [0, 1, 2, 3]
        assert len(rt.workers) == 2
    finally:
        rt.close()


def test_a_straggler_misses_the_deadline_and_the_pool_recovers(local_ray):
    rt = _runtime(round_timeout_s=3)
    try:
        t = time.monotonic()
        got = _replies(rt, {0: b"a", 1: b"hang", 2: b"b"})
        assert time.monotonic() - t < 20
        assert sorted(got) == [0, 2]
        got = _replies(rt, {0: b"x", 1: b"y", 2: b"z"})
        assert sorted(got) == [0, 1, 2]
    finally:
        rt.close()


class ProbeWorker(ClientWorker):
    """Loads the tiny model (over lent weights when given them) and replies with the path of the mapping
    of its address space that holds the embedding, and the embedding's first value."""

    def handle(self, cid, payload, state):
        from fedtune.models.loading import load_model

        w = load_model("tiny-llama").model.get_input_embeddings().weight.detach()
        ptr = w.untyped_storage().data_ptr()
        with open("/proc/self/maps") as f:
            for line in f:
                span, *rest = line.split()
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= ptr < hi:
                    return f"{' '.join(rest[4:])}:{float(w[0, 0])}".encode(), state
        return b"?:0", state


def test_workers_build_their_model_over_the_one_copy_in_the_object_store(local_ray, model_cache):
    from fedtune.models.loading import load_model

    own = load_model("tiny-llama").model
    params = dict(own.named_parameters(remove_duplicate=False))
    cfg = ExperimentConfig.model_validate({"partition": {"num_clients": 2}, "runtime": {"name": "ray"}})
    rt = RayRuntime(cfg.runtime.ray, None, 2, dict, worker=ProbeWorker, base=("tiny-llama", params, set()))
    try:
        got = _replies(rt, {0: b"", 1: b""})
        for mapping, first in got.values():
            assert "plasma" in mapping or mapping.startswith("/dev/shm"), mapping
            assert float(first) == float(own.get_input_embeddings().weight[0, 0])
        # the driver's own model reads the stored copy too
        assert (
            params["model.embed_tokens.weight"].untyped_storage().data_ptr()
            == rt._lent[1]["model.embed_tokens.weight"][2].ctypes.data
        )
    finally:
        rt.close()
