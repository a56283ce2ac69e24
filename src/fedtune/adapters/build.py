"""A base model with its seeded adapter, from a config: what every process builds identically."""

from __future__ import annotations

import os

from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.config import ExperimentConfig
from fedtune.models.activation_checkpointing import checkpoint_activations
from fedtune.models.device import device_of
from fedtune.models.loading import load_model


def seeded_adapter(
    cfg: ExperimentConfig, model_name: str | None = None
) -> tuple[AdapterModel, PreTrainedTokenizerBase]:
    """Load ``model_name`` (default ``cfg.model.name``, with cfg.model's other settings) and attach the
    adapter of ``cfg.adapter``, initialised from the adapter seed: a pure function of the config."""
    m = cfg.model
    name = model_name or m.name
    gguf = m.gguf_file if name == m.name else None
    loaded = load_model(name, m.dtype, m.revision, gguf, m.trust_remote_code)
    lora_mode = cfg.aggregation.lora_mode() if cfg.adapter.is_lora() else None
    adapter = AdapterModel(
        loaded.model,
        cfg.adapter,
        cfg.adapter.init_seed if cfg.adapter.init_seed is not None else cfg.seed,
        base_path=os.path.abspath(loaded.path),
        freeze_a=lora_mode == "ffa",
        extra_ranks=[cfg.adapter.rank_of_client(c) for c in range(cfg.partition.num_clients)],
    )
    if cfg.training.gradient_checkpointing:
        checkpoint_activations(loaded.model)
    device = device_of(cfg)
    if device.type != "cpu":  # the initial adapter was drawn on the CPU: the same on every device
        adapter.model.to(device)
    return adapter, loaded.tokenizer
