"""Runtimes move messages between the round loop and clients; only their modules import Ray or Flower.

Nothing heavy is imported here: Flower imports ``fedtune.runtime.flower.app`` in a fresh process
for every message a deployed client receives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedtune.client.handler import ClientHandler
    from fedtune.config import ExperimentConfig
    from fedtune.runtime.base import Runtime


def build_runtime(cfg: ExperimentConfig, make_handler: Callable[[], ClientHandler]) -> Runtime:
    """The runtime cfg.runtime.name names; ``make_handler`` serves clients in this process (in_process)."""
    if cfg.runtime.name == "ray":
        from fedtune.runtime.ray_pool import RayRuntime  # Ray is imported only when asked for

        return RayRuntime(cfg)
    from fedtune.runtime.in_process import InProcessRuntime

    return InProcessRuntime(make_handler().handle)
