"""Where the model runs (``model.device``): the GPU where torch sees one and the run can use it, else the CPU.

Only the model and what flows through it live on the device: batches are moved there as they enter
the model, and every tensor that leaves it (adapter state, updates, metrics) is a CPU tensor, so
codecs, aggregation, checkpoints and messages never see a device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedtune.config_runtime import gpu_misfit
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig


def device_of(cfg: ExperimentConfig) -> torch.device:
    """``model.device`` resolved in this process: auto is the first GPU where torch sees one and nothing in
    the config keeps the run off it (``config_runtime.gpu_misfit``), else the CPU."""
    setting = cfg.model.device
    if setting == "auto":
        gpu = torch.cuda.is_available() and gpu_misfit(cfg) is None
        return torch.device("cuda" if gpu else "cpu")
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


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (the same dict when they are there already)."""
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}
