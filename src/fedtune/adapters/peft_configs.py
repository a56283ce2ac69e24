"""peft configs for the methods peft implements, built from ``adapter.*`` config keys."""

from __future__ import annotations

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
from fedtune.errors import ConfigError

PEFT_METHODS = ("lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning")
FEEDFORWARD_NAMES = ("down_proj", "fc2", "w2", "dense_4h_to_h")  # MLP output layers (IA3 scales their input)


def peft_config(cfg: AdapterConfig, rank: int | None = None) -> PeftConfig:
    """The peft config of ``cfg.method`` (LoRA at ``rank``, default the global rank ``cfg.r``)."""
    task = "CAUSAL_LM"
    if cfg.method == "lora":
        return LoraConfig(
            r=rank or cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.targets(),
            use_dora=cfg.dora,
            task_type=task,
        )
    if cfg.method == "ia3":
        targets = cfg.targets()
        ff = cfg.feedforward_modules
        ff = [t for t in targets if t in FEEDFORWARD_NAMES] if ff is None else ff
        if not set(ff) <= set(targets):
            raise ConfigError(f"adapter.feedforward_modules={ff} must be a subset of adapter.target_modules={targets}")
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type=task)
    if cfg.method == "prompt_tuning":  # initialised from embeddings of random vocabulary tokens
        return PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, task_type=task
        )
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task)
    if cfg.method == "p_tuning":
        return PromptEncoderConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size, task_type=task
        )
    raise ValueError(f"{cfg.method} is not a peft method; peft methods: {', '.join(PEFT_METHODS)}")
