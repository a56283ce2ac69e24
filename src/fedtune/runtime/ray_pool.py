"""Scale-out simulation: a pool of Ray workers sharing one copy of the base model per node.

The driver puts its base weights in Ray's object store once; every worker on the node (and the
driver itself) maps that copy read-only and builds its model over it, so a worker's memory is its
adapters, optimizer state and activations, not a model of its own.

Client jobs are scheduled onto idle workers (the one that served the client last, when it is idle:
``runtime.base.Affinity``); each job carries the client's persistent state
(SCAFFOLD's c_i, error-feedback residuals, a held adapter) in and out, and the driver keeps it,
so worker memory stays flat however many clients are simulated and checkpoints hold every
client's state exactly as in_process does. A worker that dies (killed, out of memory) or misses
the round deadline costs its client that round's reply; it is replaced for the next job.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from fedtune.config.runtime import RayConfig
from fedtune.core.errors import ConfigError
from fedtune.core.types import Envelope
from fedtune.models.shared import adopt, from_arrays, to_arrays
from fedtune.runtime.base import PLAIN, Affinity, Delivery, Handle, SimulatedClients
from fedtune.runtime.worker import ClientWorker

log = logging.getLogger(__name__)

# PYTHONPATH: a plug-in named by its import path (a paradigm of one's own) imports in the workers too
FORWARDED_ENV = ("FEDTUNE_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")


class RayRuntime(SimulatedClients):
    def __init__(
        self,
        rc: RayConfig,
        timeout_s: float | None,
        clients_per_round: int,
        build: Callable[[], Handle],
        worker: type = ClientWorker,
        base: tuple[str, dict[str, torch.nn.Parameter], set[str]] | None = None,
    ):
        """``rc``: runtime.ray; ``timeout_s``: a client's deadline to reply (none: wait);
        ``build``: a picklable recipe each worker calls to build its client side;
        ``worker``: the class each Ray actor runs, built with (build, cwd, torch threads[, base weights]);
        ``base``: (model name, the driver's base parameters by name, the names adapters train): put in
        the object store once, mapped by every worker on the node and by the driver itself."""
        super().__init__()
        self.timeout = timeout_s
        self.started = False
        self.affinity = Affinity()  # a client's jobs go to the worker that served it last, when free
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": {"env_vars": env}}
            if rc.address is None:
                kwargs["num_cpus"] = os.cpu_count() or 1
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            try:
                ray.init(address=rc.address, logging_level=logging.WARNING, **kwargs)
            except ConnectionError as exc:
                raise ConfigError(
                    f"runtime.ray.address={rc.address!r}: no Ray cluster answered ({exc}). Start one with "
                    "`ray start --head` and give its address, or leave runtime.ray.address unset for a local one"
                ) from exc
            self.started = True
        cpus = ray.cluster_resources().get("CPU", 1)
        fits = max(1, math.floor(cpus / rc.cpus_per_worker))
        self.num_workers = rc.num_workers or min(fits, clients_per_round)
        threads = rc.torch_threads or max(1, int(rc.cpus_per_worker))
        self._actor = ray.remote(num_cpus=rc.cpus_per_worker, num_gpus=rc.gpus_per_worker)(worker)
        self._args: tuple = (build, os.getcwd(), threads)
        self._lent = None
        if base is not None:
            self._args += (self._share(*base),)
        t = time.perf_counter()
        self.workers, self._starting = [], []
        for _ in range(self.num_workers):
            self._spawn()
        self._ready()  # fail here, not mid-round, if workers cannot start
        log.info(
            "ray: %d workers (%.3g CPU, %d torch threads each) ready in %.1fs",
            self.num_workers,
            rc.cpus_per_worker,
            threads,
            time.perf_counter() - t,
        )

    def _share(self, name: str, params: dict[str, torch.nn.Parameter], trained: set[str]) -> ray.ObjectRef:
        """Put the base weights in the object store; from then on the driver's model reads that copy too."""
        t = time.perf_counter()
        ref = ray.put((name, to_arrays(params, trained)))
        self._lent = ray.get(ref)  # zero-copy views of the stored arrays, held while the model uses them
        adopt({n: p for n, p in params.items() if n not in trained}, from_arrays(self._lent[1]))
        log.info("ray: base weights of %s put in the object store in %.1fs", name, time.perf_counter() - t)
        return ref

    def _spawn(self) -> None:
        w = self._actor.remote(*self._args)
        self.workers.append(w)
        self._starting.append(w.pid.remote())

    def _ready(self) -> None:
        """Wait for started or replaced workers to load their model: start-up is not a round's time."""
        ray.get(self._starting)
        self._starting = []

    def send_and_receive(self, envelopes: Sequence[Envelope], delivery: Delivery = PLAIN) -> list[Envelope]:
        self._ready()
        pending, idle = deque(envelopes), list(self.workers)
        inflight: dict[Any, tuple[Envelope, Any]] = {}
        deadline = time.monotonic() + self.timeout if self.timeout else None
        replies: list[Envelope] = []
        while pending or inflight:
            while pending and idle:
                e = pending.popleft()
                w = self.affinity.pick(e.client_id, idle, (p.client_id for p in pending))
                self.affinity.served(e.client_id, w)
                inflight[w.handle.remote(e.client_id, e.payload, self.state_of(e.client_id))] = (e, w)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=left)
            for ref in done:
                e, w = inflight.pop(ref)
                try:
                    payload, state = ray.get(ref)
                except RayActorError as exc:
                    log.warning("client %d: its worker died (%s); replacing the worker", e.client_id, exc)
                    self._replace(w)
                    idle.append(self.workers[-1])
                    continue
                idle.append(w)
                self.keep(e.client_id, state)
                replies.append(Envelope(e.client_id, payload))
        for e, w in inflight.values():  # missed the deadline: stop the straggler, free its slot
            log.warning("client %d missed the %.0fs round deadline; restarting its worker", e.client_id, self.timeout)
            ray.kill(w)
            self._replace(w)
        return replies

    def _replace(self, dead: Any) -> None:
        self.workers.remove(dead)
        self._spawn()

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.started:
            ray.shutdown()
