"""The runtime section: how messages reach clients (in_process, a Ray pool, a Flower deployment)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedtune.config.base import Strict


class RayConfig(Strict):
    """Scale-out simulation: a pool of Ray workers, each holding one base model."""

    address: str | None = Field(
        None, description="None: start a local Ray instance; 'auto' or ray://HOST:10001: join that cluster"
    )
    num_workers: int | None = Field(None, ge=1, description="workers (one model each); default: one per CPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs Ray reserves for each worker")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker; default cpus_per_worker")


class FlowerConfig(Strict):
    """Deployment: `fedtune server CONFIG` coordinates, `fedtune client CONFIG --data PATH --key KEY` joins."""

    address: str = Field("127.0.0.1:9092", description="HOST:PORT where clients reach the coordinator")
    listen: str | None = Field(None, description="HOST:PORT the coordinator binds (e.g. 0.0.0.0:9092); default address")
    certs: str = Field(
        "certs", description="folder from `fedtune certs`: ca.crt (everyone), server.pem + server.key (coordinator)"
    )
    clients: str | None = Field(None, description="folder of enrolled client keys NAME.pub; default CERTS/clients")
    insecure: bool = Field(False, description="plain text, no TLS and no enrolment: trials on one machine only")
    join_timeout_s: float = Field(600.0, gt=0, description="how long the coordinator waits for clients to come online")
    poll_s: float | Literal["auto"] = Field(
        "auto",
        description="the longest the coordinator and each client wait before asking the SuperLink again while a "
        "conversation is under way (waits start at 5 ms after each message and double up to this; after 60 s "
        "without a message, up to 1 s or 10 times this). auto: 20 ms for the coordinator; for clients 20 ms, or "
        "15 ms per client where that is more, so that waiting clients keep the SuperLink's one core at most about "
        "half busy (an empty ask costs it 7-9 ms)",
    )

    direct: bool = Field(
        True,
        description="in-round exchanges over a direct TLS channel each client opens to the coordinator (requests "
        "signed with its enrolment key; Flower still admits clients, starts the run and reaches any client the "
        "channel does not): a request and a response per exchange instead of polling the SuperLink. Needs TLS",
    )
    direct_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="the port the direct channel listens on, on the coordinator's listen host (open it to the "
        "clients beside the SuperLink's); default: the SuperLink's port + 1; 0: any free port. Clients learn it "
        "beside their first Flower message. If it cannot be bound, the run goes on through Flower alone",
    )

    @field_validator("poll_s")
    @classmethod
    def _poll(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0 < v <= 10:
            raise ValueError(f"poll_s={v}: give seconds in (0, 10], or auto")
        return v

    def host_port(self, listen: bool = False) -> tuple[str, int]:
        where = (self.listen or self.address) if listen else self.address
        host, _, port = where.rpartition(":")
        return host.strip("[]"), int(port)

    @field_validator("address", "listen")
    @classmethod
    def _has_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{v!r} is not HOST:PORT (e.g. 127.0.0.1:9092)")
        return v


class RuntimeConfig(Strict):
    """How messages reach clients."""

    name: Literal["in_process", "ray", "flower"] = Field(
        "in_process",
        description="in_process: one process, one shared base model; ray: a worker pool; "
        "flower: deployment (fedtune server / fedtune client)",
    )
    lanes: int | Literal["auto"] = Field(
        "auto",
        description="in_process: clients trained at once, each lane a forked process with one torch thread, "
        "all reading one copy of the base weights; auto: one per CPU core, at most the clients per round",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="in_process with one lane: torch threads its clients train with (default: torch's, one per "
        "core); more lanes run one each: a client's reply is bit-identical across lanes=N and lanes=1 with 1 thread",
    )
    joint_clients: int | Literal["auto"] = Field(
        "auto",
        description="in_process with one lane: train up to this many clients' LoRA adapters in one "
        "forward/backward over the shared base (rows routed to each client's tensors, each with its own "
        "optimizer and clipping; the same training up to float order). auto: up to 8 on a GPU, 1 on the CPU "
        "(where lanes are faster)",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)

    @field_validator("lanes", "joint_clients")
    @classmethod
    def _positive(cls, v: int | str, info: ValidationInfo) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"{info.field_name}={v}: give at least 1, or auto")
        return v

    @model_validator(mode="after")
    def _threads_fit_lanes(self) -> RuntimeConfig:
        if isinstance(self.lanes, int) and self.lanes > 1 and self.torch_threads not in (None, 1):
            raise ValueError(
                f"runtime.lanes={self.lanes} with runtime.torch_threads={self.torch_threads}: each lane is a forked "
                "process and runs one torch thread (GNU OpenMP cannot start a thread team in a forked child). "
                "Use lanes=1 for several threads per client, or leave torch_threads unset"
            )
        if self.joint_clients not in (1, "auto") and (self.name != "in_process" or self.lanes not in (1, "auto")):
            raise ValueError(
                f"runtime.joint_clients={self.joint_clients} trains clients together in one process: it needs "
                f"runtime.name=in_process with one lane (this config: name={self.name}, lanes={self.lanes}); "
                "set lanes=1 or auto, or remove joint_clients"
            )
        return self
