"""Runtimes move messages between the round loop and clients; they are transports and nothing else.

in_process (one process, one shared model), ray_pool (a Ray worker pool) and flower_grid (a Flower
deployment's Grid) know nothing of what the bytes mean and import nothing above them: a runtime is
handed the client side as a function (``Handle``), or a picklable recipe that builds one in a worker
process. Only ray_pool imports Ray, only flower_grid and flower_wire import Flower; the deployment
commands that start Flower's processes live above, in ``fedtune.deploy``. Nothing heavy is imported
here: Flower imports ``fedtune.runtime.flower_wire`` in a fresh process for every message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.runtime.base import ClientSide, Handle, Runtime


def build_runtime(
    cfg: ExperimentConfig,
    handle: Callable[[], ClientSide],
    build_remote: Callable[[], Handle],
    base: Callable[[], tuple[str, dict, set[str]]] | None = None,
) -> Runtime:
    """The runtime cfg.runtime.name names.

    ``handle()`` gives the client side built in this process (in_process); ``build_remote`` is a
    picklable zero-argument recipe each Ray worker calls to build its own, bit-identical one;
    ``base()``: (model name, base parameters by name, names adapters train) for Ray's workers to share.
    """
    if cfg.runtime.name == "ray":
        from fedtune.runtime.ray_pool import RayRuntime  # Ray is imported only when asked for

        return RayRuntime(cfg, build_remote, base=base() if base is not None else None)
    from fedtune.runtime.in_process import InProcessRuntime

    side, r = handle(), cfg.runtime
    lanes, group = lane_count(cfg), joint_count(cfg)
    many = side.handle_many if group > 1 else None
    return InProcessRuntime(side.handle, lanes, r.torch_threads, cfg.federation.round_timeout_s, many, group)


def lane_count(cfg: ExperimentConfig) -> int:
    """runtime.lanes, with auto resolved: one lane per core this process may use, at most one per client a round
    (one lane with several torch threads per client, with joint training, or on a GPU)."""
    from fedtune.errors import ConfigError
    from fedtune.models.device import device_of
    from fedtune.runtime.lanes import available_cores

    r = cfg.runtime
    gpu = device_of(cfg).type == "cuda"
    if r.lanes == "auto":
        serial = r.torch_threads not in (None, 1) or joint_count(cfg) > 1 or gpu
        return 1 if serial else min(available_cores(), cfg.clients_per_round())
    if gpu and r.lanes > 1:
        raise ConfigError(
            f"runtime.lanes={r.lanes} with the model on a GPU (model.device={cfg.model.device}): lanes are forked "
            "processes, and CUDA does not survive a fork; use lanes=1 or auto, or model.device=cpu"
        )
    return r.lanes


def joint_count(cfg: ExperimentConfig) -> int:
    """runtime.joint_clients, with auto resolved: up to 8 clients a pass with the model on a GPU in process
    (where the configuration allows joint training), else 1."""
    from fedtune.config_runtime import joint_misfit
    from fedtune.models.device import device_of

    r = cfg.runtime
    if r.joint_clients != "auto":
        return r.joint_clients
    if r.name != "in_process" or r.lanes not in (1, "auto") or joint_misfit(cfg) is not None:
        return 1
    return min(8, cfg.clients_per_round()) if device_of(cfg).type == "cuda" else 1
