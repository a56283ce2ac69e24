"""Where a process runs its work: the device its model lives on, the lanes clients train in, how many
clients train in one forward. Resolved once per process from the config's ``auto`` settings and the
machine (``runtime.lanes``, ``runtime.joint_clients``, ``model.device``), then handed down; never saved,
since a resumed run may find another machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fedtune.config.model import ModelConfig
from fedtune.config.runtime import RuntimeConfig
from fedtune.core.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    device: torch.device  # where the model trains and evaluates (batches go there; adapter state stays on the CPU)
    lanes: int  # in_process: clients trained at once, each in a forked lane with one torch thread
    joint: int  # in_process, one lane: clients whose adapters train in one forward/backward
    joint_asked: bool = False  # runtime.joint_clients was a number, not auto: a model that cannot is an error


def place(
    model: ModelConfig,
    runtime: RuntimeConfig,
    clients_per_round: int,
    gpu_misfit: str | None,
    joint_misfit: str | None,
) -> Placement:
    """Resolve ``model.device``, ``runtime.joint_clients`` and ``runtime.lanes`` in this process.

    ``gpu_misfit`` / ``joint_misfit``: what in the config keeps the model off a GPU / its clients from
    training jointly (``config.experiment``), None when nothing does. auto: a GPU where torch sees one and
    nothing keeps the run off it; up to 8 joint clients a pass on a GPU, else 1; one lane per core, at most
    the clients per round (one lane with several threads per client, with joint training, or on a GPU).
    """
    device = device_of(model.device, gpu_misfit)
    gpu = device.type == "cuda"
    joint = runtime.joint_clients
    if joint == "auto":
        together = runtime.name == "in_process" and runtime.lanes in (1, "auto") and joint_misfit is None
        joint = min(8, clients_per_round) if together and gpu else 1
    lanes = runtime.lanes
    if lanes == "auto":
        serial = runtime.torch_threads not in (None, 1) or joint > 1 or gpu
        lanes = 1 if serial else min(available_cores(), clients_per_round)
    elif gpu and lanes > 1:
        raise ConfigError(
            f"runtime.lanes={lanes} with the model on a GPU (model.device={model.device}): lanes are forked "
            "processes, and CUDA does not survive a fork; use lanes=1 or auto, or model.device=cpu"
        )
    return Placement(device, lanes, joint, runtime.joint_clients != "auto")


def device_of(setting: str, gpu_misfit: str | None = None) -> torch.device:
    """``model.device`` resolved in this process: auto is the first GPU where torch sees one and nothing keeps
    the run off it (``gpu_misfit`` None), else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and gpu_misfit is None else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.device={setting}: torch sees no GPU in this process (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); use cpu, or auto to take a GPU only where there is one"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={setting}: this process sees {torch.cuda.device_count()} GPU(s)")
    return device


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
