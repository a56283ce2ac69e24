"""One base model with one trainable adapter whose tensors can be read and swapped by name.

Simulated clients share this single model: a client's turn is ``set_state(global)``, train,
``get_state()``. The adapter is any method of ``adapter.method``: the peft ones (LoRA/DoRA, IA3,
prompt, prefix and P-tuning) through peft, bottleneck adapters and BitFit through our own small
tuners. Names are the trainable parameters' names with peft's adapter name removed
(``...q_proj.lora_A.weight``), which for LoRA are exactly the keys of ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from fedtune.adapters.lora_math import rank_of
from fedtune.adapters.peft_configs import peft_config
from fedtune.config import AdapterConfig
from fedtune.core.errors import ConfigError
from fedtune.core.registry import PEFT_METHODS
from fedtune.core.types import Params
from fedtune.models.blocks import blocks_of, layout_of
from fedtune.models.quantised import logical_numel

ADAPTER = "default"
NATIVE_CONFIG = "fedtune_adapter.json"  # marks an exported adapter of one of our own tuners
NATIVE_WEIGHTS = "adapter_model.safetensors"


class AdapterModel:
    """A causal LM with an adapter, plus a name -> Parameter map of the active adapter's trainable tensors.

    With heterogeneous client ranks (LoRA only) the model holds one LoRA adapter per rank (peft's
    named adapters, all on the one base model); ``activate(rank)`` switches which one trains and
    which tensors ``params`` / ``get_state`` / ``set_state`` see. The adapter of rank ``cfg.r``
    (the global rank) is peft's "default" adapter: evaluation and export use it.
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
        self.cfg, self.method = cfg, cfg.method
        self.global_rank, self.freeze_a = cfg.r, freeze_a
        ranks = sorted(set(extra_ranks) - {cfg.r}) if cfg.is_lora() else []
        self.adapter_names = {cfg.r: ADAPTER, **{r: f"rank{r}" for r in ranks}}
        if base_path is not None:
            base.config.name_or_path = base_path  # what the exported adapter config points at
        # the base model's own parameters by their own names (tied ones under each name), before any
        # tuner renames their modules: what another process needs to build this model over them
        self.base_params = dict(base.named_parameters(remove_duplicate=False))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial adapter is a pure function of the seed
            self.model = self._wrap(base, cfg)
        self._by_adapter = self._collect(cfg)
        if not all(self._by_adapter.values()):
            raise ConfigError(f"adapter.method={cfg.method} found nothing to train in this model")
        self.params: dict[str, torch.nn.Parameter] = {}
        self.activate(cfg.r)

    def _wrap(self, base: PreTrainedModel, cfg: AdapterConfig) -> torch.nn.Module:
        tuner = _own_tuner(cfg.method)
        blocks = self._blocks = _blocks(base, cfg)
        try:
            if tuner is not None:
                self._own = tuner.attach(base, cfg, blocks)
                return base
            with warnings.catch_warnings():  # transformers deprecation noise raised inside peft
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model = get_peft_model(base, peft_config(cfg, None, blocks))
                for r, name in self.adapter_names.items():
                    if name != ADAPTER:
                        model.add_adapter(name, peft_config(cfg, r, blocks))
        except ValueError as exc:
            raise _bad_targets(cfg, base, str(exc)) from None
        return model

    def _collect(self, cfg: AdapterConfig) -> dict[str, dict[str, torch.nn.Parameter]]:
        """adapter name -> {state name: parameter} of the tensors that train (and travel)."""
        if _own_tuner(cfg.method) is not None:
            return {ADAPTER: self._own}
        by_adapter = {}
        for name in self.adapter_names.values():
            by_adapter[name] = {
                ".".join(part for part in n.split(".") if part != name): p
                for n, p in self.model.named_parameters()
                if name in n.split(".") and not (self.freeze_a and ".lora_A." in n)
            }
        return by_adapter

    def lendable(self) -> tuple[dict[str, torch.nn.Parameter], set[str]]:
        """The base model's parameters by name (``models.shared.to_arrays``), and those an adapter trains."""
        trains = {id(p) for params in self._by_adapter.values() for p in params.values()}
        return self.base_params, {n for n, p in self.base_params.items() if id(p) in trains}

    def activate(self, rank: int) -> None:
        """Make the adapter of this rank the one that runs, trains and is read or written."""
        if rank not in self.adapter_names:
            raise ValueError(f"no adapter of rank {rank}; this model has ranks {sorted(self.adapter_names)}")
        name = self.adapter_names[rank]
        if self.params is self._by_adapter.get(name):
            return
        if isinstance(self.model, PeftModel):
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
        """Parameters of the base model plus the active adapter's (other ranks' adapters not counted; a
        quantised weight counts the values it stands for)."""
        others = {id(p) for ps in self._by_adapter.values() if ps is not self.params for p in ps.values()}
        return sum(logical_numel(p) for p in self.model.parameters() if id(p) not in others)

    def get_state(self) -> Params:
        """A detached copy of the adapter tensors, on the CPU wherever the model is."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}

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

    def load(self, params: Params) -> None:
        """Activate the adapter of the rank these params have (heterogeneous LoRA ranks), then load them."""
        rank = rank_of(params)
        if rank is not None:
            self.activate(rank)
        self.set_state(params)

    def save(self, path: str | Path, state: Params) -> None:
        """Write the global adapter as a directory ``load_adapter(base, path)`` reads; peft's methods
        are written by peft, so ``PeftModel.from_pretrained(base, path)`` loads them too."""
        self.activate(self.global_rank)
        self.set_state(state)
        if isinstance(self.model, PeftModel):
            self.model.save_pretrained(str(path), selected_adapters=[ADAPTER])
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.params.items()}, str(path / NATIVE_WEIGHTS))
        meta = {
            "method": self.method,
            "base_model_name_or_path": getattr(self.model.config, "name_or_path", None),
            **_own_tuner(self.method).export_meta(self.cfg, self._blocks),
        }
        (path / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_adapter(base: PreTrainedModel, path: str | Path) -> torch.nn.Module:
    """A base model with an exported fedtune adapter applied, ready for inference.

    peft methods load through ``PeftModel.from_pretrained``; bottleneck adapters are re-injected and
    BitFit biases copied into the base model (which is modified in place).
    """
    path = Path(path)
    native = path / NATIVE_CONFIG
    if not native.is_file():
        return PeftModel.from_pretrained(base, str(path))
    meta = json.loads(native.read_text())
    state = load_file(str(path / NATIVE_WEIGHTS))
    tuner = _own_tuner(meta["method"]) if meta.get("method") in PEFT_METHODS else None
    if tuner is None:
        raise ValueError(f"{native}: unknown method {meta.get('method')!r}")
    params = tuner.restore(base, meta)
    if state.keys() != params.keys():
        raise ValueError(
            f"{path}: adapter tensors do not match this base model (e.g. {sorted(state.keys() ^ params.keys())[:2]})"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    return base.eval()


def _blocks(base: PreTrainedModel, cfg: AdapterConfig) -> tuple[list[int], str] | None:
    """``adapter.layers`` resolved for ``base``: (block indices, the blocks' attribute), or None for every block."""
    if cfg.layers is None:
        return None
    found = blocks_of(base)
    if found is None:
        kind = getattr(base.config, "model_type", None)
        raise ConfigError(f"adapter.layers: fedtune does not know where model type {kind!r} keeps its blocks")
    blocks, lm = found
    try:
        return cfg.blocks(len(blocks)), layout_of(lm).blocks
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _own_tuner(method: str):
    """The tuner object of a method fedtune implements itself (bottleneck, bitfit); None for peft's."""
    return None if PEFT_METHODS.entry(method).info.get("peft") else PEFT_METHODS.load(method)


def virtual_token_offset(model: torch.nn.Module) -> int:
    """How many virtual tokens a peft prompt-learning model prepends to the sequence (prefix tuning
    puts them in the attention cache instead, so its positions do not move)."""
    if not isinstance(model, PeftModel):
        return 0
    cfg = model.active_peft_config
    if not cfg.is_prompt_learning or cfg.peft_type.value == "PREFIX_TUNING":
        return 0
    return int(cfg.num_virtual_tokens)


def _bad_targets(cfg: AdapterConfig, base: torch.nn.Module, why: str) -> ConfigError:
    return ConfigError(
        f"adapter.target_modules={cfg.targets()} do not fit this model for method {cfg.method}: {why}. "
        f"Linear layers it has: {', '.join(linear_module_names(base))}"
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of Linear layers (candidates for target_modules)."""
    names = {re.sub(r".*\.", "", n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


__all__ = ["AdapterModel", "linear_module_names", "load_adapter", "virtual_token_offset"]
