"""One base model with one trainable PEFT adapter whose tensors can be read and swapped by name.

Simulated clients share this single model: a client's turn is ``set_state(global)``, train,
``get_state()``. Names are peft's saved-adapter keys (``...q_proj.lora_A.weight``), so a state
is exactly what ``adapter_model.safetensors`` holds.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import PreTrainedModel

from fedtune.config import AdapterConfig
from fedtune.errors import ConfigError
from fedtune.types import Params

ADAPTER = "default"


class AdapterModel:
    """A PEFT-wrapped causal LM plus a name -> Parameter map of the active adapter's trainable tensors.

    With heterogeneous client ranks the model holds one LoRA adapter per rank (peft's named
    adapters, all on the one base model); ``activate(rank)`` switches which one trains and which
    tensors ``params`` / ``get_state`` / ``set_state`` see. The adapter of rank ``cfg.r`` (the
    global rank) is peft's "default" adapter: evaluation and export use it.
    """

    def __init__(
        self,
        base: PreTrainedModel,
        cfg: AdapterConfig,
        seed: int,
        base_path: str | None = None,
        freeze_a: bool = False,
        extra_ranks: Sequence[int] = (),
    ):
        """``freeze_a`` keeps every lora_A at its seeded initialisation (FFA-LoRA): only B trains and travels."""
        self.global_rank, self.freeze_a = cfg.r, freeze_a
        self.adapter_names = {cfg.r: ADAPTER, **{r: f"rank{r}" for r in sorted(set(extra_ranks) - {cfg.r})}}
        if base_path is not None:
            base.config.name_or_path = base_path  # what the exported adapter_config.json points at
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial adapter is a pure function of the seed
            try:
                with warnings.catch_warnings():  # transformers deprecation noise raised inside peft
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                    self.model: PeftModel = get_peft_model(base, _lora_config(cfg, cfg.r))
                    for r, name in self.adapter_names.items():
                        if name != ADAPTER:
                            self.model.add_adapter(name, _lora_config(cfg, r))
            except ValueError as exc:
                raise ConfigError(
                    f"adapter.target_modules={cfg.target_modules} do not fit this model: {exc}. "
                    f"Linear layers it has: {', '.join(linear_module_names(base))}"
                ) from None
        self._by_adapter: dict[str, dict[str, torch.nn.Parameter]] = {}
        for name in self.adapter_names.values():
            marker = f".{name}."
            self._by_adapter[name] = {
                n.replace(marker, "."): p
                for n, p in self.model.named_parameters()
                if marker in n and not (freeze_a and ".lora_A." in n)
            }
            saved = set(get_peft_model_state_dict(self.model, adapter_name=name))
            if not set(self._by_adapter[name]) <= saved:  # our names must be peft's saved keys, or export breaks
                raise RuntimeError(f"adapter key mismatch with peft: {sorted(set(self._by_adapter[name]) - saved)[:4]}")
        self.params: dict[str, torch.nn.Parameter] = {}
        self.activate(cfg.r)

    def activate(self, rank: int) -> None:
        """Make the adapter of this rank the one that runs, trains and is read or written."""
        if rank not in self.adapter_names:
            raise ValueError(f"no adapter of rank {rank}; this model has ranks {sorted(self.adapter_names)}")
        name = self.adapter_names[rank]
        if self.params is self._by_adapter.get(name):
            return
        self.model.set_adapter(name)
        for p in self.model.parameters():  # exactly the active adapter's trainable tensors
            p.requires_grad_(False)
        for p in self._by_adapter[name].values():
            p.requires_grad_(True)
        self.params = self._by_adapter[name]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def num_total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def get_state(self) -> Params:
        """A detached copy of the adapter tensors."""
        return {k: p.detach().clone() for k, p in self.params.items()}

    def set_state(self, state: Params) -> None:
        """Copy tensors into the adapter in place; keys and shapes must match exactly."""
        if state.keys() != self.params.keys():
            missing, extra = self.params.keys() - state.keys(), state.keys() - self.params.keys()
            raise ValueError(f"adapter state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        with torch.no_grad():
            for k, p in self.params.items():
                if state[k].shape != p.shape:
                    raise ValueError(f"adapter state {k}: shape {tuple(state[k].shape)} != {tuple(p.shape)}")
                p.copy_(state[k])

    def save(self, path: str | Path, state: Params) -> None:
        """Write the global-rank adapter as a dir that ``PeftModel.from_pretrained(base, path)`` loads."""
        self.activate(self.global_rank)
        self.set_state(state)
        self.model.save_pretrained(str(path), selected_adapters=[ADAPTER])


def _lora_config(cfg: AdapterConfig, rank: int) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of Linear layers (candidates for target_modules)."""
    names = {re.sub(r".*\.", "", n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)
