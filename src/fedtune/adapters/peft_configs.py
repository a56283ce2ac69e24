"""peft configs for the methods peft implements, one builder per method (``registry.PEFT_METHODS``)."""

from __future__ import annotations

import re

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

from fedtune.config import AdapterConfig
from fedtune.core.errors import ConfigError
from fedtune.core.registry import PEFT_METHODS
from fedtune.models.blocks import Blocks

FEEDFORWARD_NAMES = ("down_proj", "fc2", "w2", "dense_4h_to_h")  # MLP output layers (IA3 scales their input)
TASK = "CAUSAL_LM"


def _confined(blocks: Blocks | None) -> dict:
    return {} if blocks is None else {"layers_to_transform": blocks[0], "layers_pattern": blocks[1]}


def lora(cfg: AdapterConfig, rank: int | None = None, blocks: Blocks | None = None) -> LoraConfig:
    """LoRA (or DoRA) at ``rank``, default the global rank ``cfg.r``; on ``blocks`` only, when given."""
    return LoraConfig(
        r=rank or cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets(),
        use_dora=cfg.dora,
        task_type=TASK,
        **_confined(blocks),
    )


def ia3(cfg: AdapterConfig, rank: int | None = None, blocks: Blocks | None = None) -> IA3Config:
    targets = cfg.targets()
    ff = cfg.feedforward_modules
    ff = [t for t in targets if t in FEEDFORWARD_NAMES] if ff is None else ff
    if not set(ff) <= set(targets):
        raise ConfigError(f"adapter.feedforward_modules={ff} must be a subset of adapter.target_modules={targets}")
    if blocks is not None:  # IA3Config has no layers_to_transform: a regex over the module names instead
        index, attr = blocks
        where = rf".*\.{re.escape(attr)}\.({'|'.join(map(str, index))})\..*\.({'|'.join(map(re.escape, targets))})"
        return IA3Config(target_modules=where, feedforward_modules=ff, task_type=TASK)
    return IA3Config(target_modules=targets, feedforward_modules=ff, task_type=TASK)


def prompt_tuning(cfg: AdapterConfig, rank: int | None = None, blocks: Blocks | None = None) -> PromptTuningConfig:
    """Initialised from embeddings of random vocabulary tokens."""
    return PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, task_type=TASK
    )


def prefix_tuning(cfg: AdapterConfig, rank: int | None = None, blocks: Blocks | None = None) -> PrefixTuningConfig:
    return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=TASK)


def p_tuning(cfg: AdapterConfig, rank: int | None = None, blocks: Blocks | None = None) -> PromptEncoderConfig:
    return PromptEncoderConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size, task_type=TASK
    )


def peft_config(cfg: AdapterConfig, rank: int | None = None, blocks: Blocks | None = None) -> PeftConfig:
    """The peft config of ``cfg.method`` (LoRA at ``rank``, default the global rank ``cfg.r``), confined to
    ``blocks`` (``adapter.layers`` resolved for the model) when given."""
    entry = PEFT_METHODS.entry(cfg.method)
    if not entry.info.get("peft"):
        peft_names = [e.name for e in PEFT_METHODS if e.info.get("peft")]
        raise ValueError(f"{cfg.method} is not a peft method; peft methods: {', '.join(peft_names)}")
    return PEFT_METHODS.load(cfg.method)(cfg, rank, blocks)
