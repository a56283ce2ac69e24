"""A base model with its seeded adapter, from a recipe: what every process builds identically."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
from peft import prepare_model_for_kbit_training
from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.config.adapter import AdapterConfig
from fedtune.config.model import ModelConfig
from fedtune.core.errors import ModelLoadError
from fedtune.models.activation_checkpointing import checkpoint_activations
from fedtune.models.loading import load_model


@dataclass(frozen=True)
class AdapterRecipe:
    """What fixes a process's model and initial adapter: the sections, the adapter seed, the clients' ranks."""

    model: ModelConfig
    adapter: AdapterConfig
    seed: int  # the initial adapter's seed (adapter.init_seed, else the run's seed)
    ranks: tuple[int, ...]  # each client's LoRA rank (heterogeneous ranks add their own tensors)
    freeze_a: bool = False  # FFA-LoRA: A is not trained
    checkpointing: bool = False  # training.gradient_checkpointing
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def seeded_adapter(
    recipe: AdapterRecipe, model_name: str | None = None
) -> tuple[AdapterModel, PreTrainedTokenizerBase]:
    """Load ``model_name`` (default ``model.name``, with the model section's other settings) and attach the
    adapter, initialised from the adapter seed: a pure function of the recipe."""
    m = recipe.model
    name = model_name or m.name
    gguf = m.gguf_file if name == m.name else None
    loaded = load_model(name, m.dtype, m.revision, gguf, m.trust_remote_code, m.quantization)
    if m.quantization != "none":  # QLoRA: layer norms and the like in float32, inputs that carry gradients
        loaded = replace(loaded, model=prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False))
    adapter = AdapterModel(
        loaded.model,
        recipe.adapter,
        recipe.seed,
        base_path=os.path.abspath(loaded.path),
        freeze_a=recipe.freeze_a,
        extra_ranks=list(recipe.ranks),
    )
    if recipe.checkpointing:
        checkpoint_activations(loaded.model)
    if recipe.device.type != "cpu":  # the initial adapter was drawn on the CPU: the same on every device
        if m.quantization == "int8":
            raise ModelLoadError(
                f"model.quantization=int8 with model.device={recipe.device}: an 8-bit base quantised on the CPU "
                "cannot move to another device (bitsandbytes' int8 weights do not); use model.quantization=nf4, or "
                "model.device=cpu"
            )
        adapter.model.to(recipe.device)
    return adapter, loaded.tokenizer
