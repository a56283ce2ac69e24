"""Activation (gradient) checkpointing of a transformers model, under either of its API names."""

from __future__ import annotations

from transformers import PreTrainedModel


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Each decoder block keeps only its input for backward and reruns its forward there, in training mode
    only (evaluation keeps its plain forward). Non-reentrant: no input needs a gradient, and the rerun
    replays the block's RNG state, so dropout draws the same masks and training gives the same adapter."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoints_activations(model: PreTrainedModel) -> bool:
    """Whether ``checkpoint_activations`` is on for this model (under either transformers name)."""
    new = "is_activation_checkpointing"  # asking under the old name warns where the new one exists
    return bool(getattr(model, new if hasattr(type(model), new) else "is_gradient_checkpointing", False))
