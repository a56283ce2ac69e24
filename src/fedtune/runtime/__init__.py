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
    from fedtune.config.runtime import RuntimeConfig
    from fedtune.models.placement import Placement
    from fedtune.runtime.base import ClientSide, Handle, Runtime


def build_runtime(
    runtime: RuntimeConfig,
    placement: Placement,
    timeout_s: float | None,
    clients_per_round: int,
    handle: Callable[[], ClientSide],
    build_remote: Callable[[], Handle],
    base: Callable[[], tuple[str, dict, set[str]]] | None = None,
) -> Runtime:
    """The runtime ``runtime.name`` names, placed as ``placement`` says (lanes, joint clients).

    ``handle()`` gives the client side built in this process (in_process); ``build_remote`` is a
    picklable zero-argument recipe each Ray worker calls to build its own, bit-identical one;
    ``base()``: (model name, base parameters by name, names adapters train) for Ray's workers to share.
    ``timeout_s``: federation.round_timeout_s, a client's deadline to reply.
    """
    if runtime.name == "ray":
        from fedtune.runtime.ray_pool import RayRuntime  # Ray is imported only when asked for

        return RayRuntime(
            runtime.ray, timeout_s, clients_per_round, build_remote, base=base() if base is not None else None
        )
    from fedtune.runtime.in_process import InProcessRuntime

    side = handle()
    many = side.handle_many if placement.joint > 1 else None
    return InProcessRuntime(side.handle, placement.lanes, runtime.torch_threads, timeout_s, many, placement.joint)
