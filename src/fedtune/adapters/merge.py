"""A run's final adapter folded into its base model: one plain transformers checkpoint to hand on.

LoRA (DoRA) and IA3 merge through peft's ``merge_and_unload``: W' = W + (α/r)·B·A, or W scaled by
the learned vector; BitFit's biases and tuned blocks are the base model's own parameters. The result is saved as
safetensors with its tokenizer, loadable by ``AutoModelForCausalLM.from_pretrained`` with no fedtune
and no peft, and gives the adapter's logits up to float rounding (tested). Adapters that add what the
architecture has no place for (Houlsby bottlenecks, soft prompts, prefixes) cannot be merged: the
error says how to load them instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import NATIVE_CONFIG, load_adapter
from fedtune.core.errors import ConfigError
from fedtune.core.files import replace_dir
from fedtune.core.registry import PEFT_METHODS, trains_base

MERGEABLE = ("LORA", "IA3")  # peft types merge_and_unload folds into the base weights


def adapter_folder(final_dir: Path, name: str | None = None) -> Path:
    """The folder of the adapter to merge: ``final_dir`` itself, or its subfolder ``name`` (KD's per-client ones)."""
    if not final_dir.is_dir():
        raise ConfigError(f"{final_dir} does not exist: the run has not finished (its final adapter is written last)")
    if name is not None:
        folder = final_dir / name
        if not folder.is_dir():
            raise ConfigError(f"{final_dir} has no adapter {name!r}; it has: {', '.join(_named(final_dir)) or 'none'}")
        return folder
    if (final_dir / NATIVE_CONFIG).is_file() or (final_dir / "adapter_config.json").is_file():
        return final_dir
    raise ConfigError(
        f"{final_dir} holds one adapter per name ({', '.join(_named(final_dir))}); choose one with --adapter"
    )


def _named(final_dir: Path) -> list[str]:
    return sorted(p.name for p in final_dir.iterdir() if p.is_dir())


def merged_model(base: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """``base`` with the adapter at ``folder`` folded into its weights (``base`` is consumed)."""
    native = folder / NATIVE_CONFIG
    if native.is_file():
        method = json.loads(native.read_text()).get("method")
        if not (method in PEFT_METHODS and trains_base(method)):
            raise ConfigError(
                f"{folder}: a {method} adapter adds layers a plain {type(base).__name__} has no place for, so it "
                "cannot be merged; load it with fedtune.adapters.adapter_model.load_adapter(base, folder)"
            )
        return load_adapter(base, folder)  # BitFit, blocks: the trained tensors are the base model's own
    model = load_adapter(base, folder)
    kind = model.active_peft_config.peft_type.value if isinstance(model, PeftModel) else None
    if kind not in MERGEABLE:
        raise ConfigError(
            f"{folder}: a {kind} adapter (prompt learning) has no weights to fold in, so it cannot be merged; "
            "load it with peft.PeftModel.from_pretrained(base, folder)"
        )
    return model.merge_and_unload()


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write model (safetensors) and tokenizer to ``out``, whole or not at all (``core.files.replace_dir``)."""
    model.config.use_cache = True  # the model's own default, for whoever loads it

    def write(folder: Path) -> None:
        with torch.no_grad():
            model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))

    replace_dir(out, write)
