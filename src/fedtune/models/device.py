"""Moving work to the model's device (``placement.device_of`` picks it).

Only the model and what flows through it live on the device: batches are moved there as they enter
the model, and every tensor that leaves it (adapter state, updates, metrics) is a CPU tensor, so
codecs, aggregation, checkpoints and messages never see a device.
"""

from __future__ import annotations

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (the same dict when they are there already)."""
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}
