"""Offsite-tuning's emulator: the model's middle compressed, sandwiched between the blocks clients tune.

The full model's L decoder blocks are split into ``bottom`` adapter blocks, a middle, and ``top``
adapter blocks (Xiao et al. 2023, "Offsite-Tuning: Transfer Learning without Full Model"). The
emulator keeps the adapter blocks and, of the middle's M blocks, n = round(M·(1 - drop_ratio)) spread
evenly (uniform layer drop: middle block ⌊j·(M-1)/(n-1)⌉ for j = 0..n-1, the first and the last of the
middle kept; n = 1 keeps its centre), with the embeddings, final norm and LM head. It is a model of
the same class with fewer blocks (``config.num_hidden_layers`` = bottom + n + top), so a client can
build it from its config and the tensors sent to it, never holding the full model. A tuned adapter
on the emulator's adapter blocks plugs into the full model's blocks of the same depth from the bottom
or the top (``to_full`` renames its tensors).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from fedtune.core.errors import ConfigError
from fedtune.core.types import Params
from fedtune.models.blocks import causal_lm, layout_of
from fedtune.paradigms.offsite.prune import fit_shapes


@dataclass(frozen=True)
class Sandwich:
    """Which of the full model's ``layers`` blocks the emulator holds: ``bottom`` and ``top`` adapter blocks
    and the ``kept`` middle blocks (full-model indices, ascending)."""

    layers: int
    bottom: int
    top: int
    kept: tuple[int, ...]

    @property
    def blocks(self) -> tuple[int, ...]:
        """The full model's index of each emulator block, in order."""
        return (*range(self.bottom), *self.kept, *range(self.layers - self.top, self.layers))

    @property
    def adapter_blocks(self) -> tuple[int, ...]:
        """The full model's indices of the blocks clients tune."""
        return (*range(self.bottom), *range(self.layers - self.top, self.layers))

    def describe(self) -> str:
        return (
            f"blocks 0-{self.bottom - 1} and {self.layers - self.top}-{self.layers - 1} tuned, "
            f"{len(self.kept)} of the {self.layers - self.bottom - self.top} middle blocks kept "
            f"({', '.join(map(str, self.kept))})"
        )


def layer_drop(layers: int, bottom: int, top: int, drop_ratio: float) -> Sandwich:
    """The uniform layer drop of the middle of a ``layers``-block model (ConfigError on impossible settings)."""
    if bottom < 1 or top < 1:
        raise ConfigError(f"paradigm.bottom={bottom} and paradigm.top={top}: each must be at least 1 block")
    middle = layers - bottom - top
    if middle < 1:
        raise ConfigError(
            f"paradigm.bottom={bottom} + paradigm.top={top} leave none of the model's {layers} blocks to emulate; "
            f"tune at most {layers - 1} blocks"
        )
    if not 0 <= drop_ratio < 1:
        raise ConfigError(f"paradigm.drop_ratio={drop_ratio}: must be in [0, 1) (the emulator keeps a middle block)")
    n = max(1, round(middle * (1 - drop_ratio)))
    if n == 1:
        kept = (bottom + (middle - 1) // 2,)
    else:
        kept = tuple(bottom + round(j * (middle - 1) / (n - 1)) for j in range(n))
    return Sandwich(layers, bottom, top, kept)


def num_blocks(model: nn.Module) -> int:
    lm = causal_lm(model)
    layout = layout_of(lm)
    return len(getattr(getattr(lm, layout.inner), layout.blocks))


def config_blocks(config) -> int:
    """How many decoder blocks a model of ``config`` has."""
    for key in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ConfigError(f"model type {getattr(config, 'model_type', None)!r}: its config does not say its block count")


def emulator_config(config, sandwich: Sandwich):
    """A copy of ``config`` for the emulator: as many blocks as it holds (per-block lists sliced to match)."""
    out = copy.deepcopy(config)
    n = len(sandwich.blocks)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(out, key):
            setattr(out, key, n)
    per_block = getattr(out, "layer_types", None)
    if isinstance(per_block, list) and len(per_block) == sandwich.layers:
        out.layer_types = [per_block[i] for i in sandwich.blocks]
    return out


def _renamer(model: nn.Module, mapping: dict[int, int]):
    pattern: re.Pattern = layout_of(model).block_name

    def rename(name: str) -> str | None:
        m = pattern.search(name)
        if m is None:
            return name
        block = int(m.group(1))
        if block not in mapping:
            return None
        return name[: m.start(1)] + str(mapping[block]) + name[m.end(1) :]

    return rename


def build_emulator(
    full: nn.Module, sandwich: Sandwich, share: bool = False, state: dict[str, torch.Tensor] | None = None
) -> PreTrainedModel:
    """The emulator of ``full``: a model of its class holding the sandwich's blocks, the embeddings, final norm
    and head. ``state``: the base model's tensors by their own names (``AdapterModel.base_params`` where an
    adapter wraps ``full``); default ``full``'s state dict, which must then be a plain model's. ``share``:
    the emulator's tensors are those very tensors (no copy; in-process simulation), else copies (what is
    sent to a client)."""
    lm = causal_lm(full)
    if num_blocks(lm) != sandwich.layers:
        raise ConfigError(f"the sandwich is for {sandwich.layers} blocks; the model has {num_blocks(lm)}")
    if state is None:
        state = lm.state_dict()
        if any(".base_layer." in k for k in state):
            raise ConfigError("an adapter wraps this model: pass its base tensors (AdapterModel.base_params) as state")
    rename = _renamer(lm, {b: i for i, b in enumerate(sandwich.blocks)})
    head = next((f"{n}.weight" for n, m in lm.named_modules() if m is lm.get_output_embeddings()), None)
    tied = getattr(lm.config, "tie_word_embeddings", False)
    kept = {}
    for name, tensor in state.items():
        new = rename(name)
        if new is not None and not (tied and new == head):  # a tied head is the embedding, tied again below
            kept[new] = tensor.detach() if share else tensor.detach().clone()
    with torch.device("meta"):
        emulator = type(lm)(emulator_config(lm.config, sandwich))
    missing, unexpected = emulator.load_state_dict(kept, strict=False, assign=True)
    if set(missing) - ({head} if tied else set()) or unexpected:
        raise RuntimeError(f"emulator weights do not fit: missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}")
    if tied:
        emulator.tie_weights()
    _materialise_buffers(emulator, lm)
    return emulator.eval()


def _materialise_buffers(emulator: nn.Module, full: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are not in a state dict: take the full model's, by name."""
    theirs = dict(full.named_buffers())
    for name, buf in list(emulator.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            module = emulator.get_submodule(owner) if owner else emulator
            source = theirs.get(name)
            if source is None:
                raise RuntimeError(f"emulator buffer {name} has no counterpart in the full model")
            module.register_buffer(attr, source.clone(), persistent=False)


def weights(emulator: nn.Module) -> Params:
    """What a client is sent: the emulator's parameters by its own names (a tied head once, as its embedding)."""
    return {n: p.detach() for n, p in causal_lm(emulator).named_parameters()}


def digest(tensors: Params) -> str:
    """sha256 over names, dtypes, shapes and bytes: the emulator a request names, checked on arrival."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def emulator_from(config, sandwich: Sandwich, tensors: Params, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A client's emulator: the model of ``config`` (the full model's) with the sandwich's blocks, built without
    weights and given ``tensors``, which must be exactly its parameters (names, shapes, dtypes; ValueError
    naming the first that is not). Buffers (rotary frequencies) are computed from the config as usual."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(emulator_config(config, sandwich), dtype=dtype)
    model.tie_weights()  # a tied head is the embedding: one tensor, sent once
    fit_shapes(model, range(sandwich.bottom, sandwich.bottom + len(sandwich.kept)), tensors)  # a pruned middle
    own = dict(model.named_parameters())
    if own.keys() != tensors.keys():
        missing, extra = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
        raise ValueError(f"the emulator sent does not fit: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in own.items():
        t = tensors[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(f"emulator tensor {name}: {t.dtype} {tuple(t.shape)}, expected {p.dtype} {tuple(p.shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model.eval()


def _rename_blocks(params: Params, model: nn.Module, mapping: dict[int, int], what: str) -> Params:
    rename = _renamer(model, mapping)
    out = {}
    for name, tensor in params.items():
        new = rename(name)
        if new is None:
            raise ConfigError(f"adapter tensor {name} lies in {what}; only adapter blocks are tuned")
        out[new] = tensor
    return out


def from_full(params: Params, full: nn.Module, sandwich: Sandwich) -> Params:
    """An adapter on the full model's adapter blocks, renamed onto the emulator (``to_full``'s inverse)."""
    mapping = {b: i for i, b in enumerate(sandwich.blocks) if b in sandwich.adapter_blocks}
    return _rename_blocks(params, full, mapping, "a block the emulator does not tune")


def to_full(params: Params, emulator: nn.Module, sandwich: Sandwich) -> Params:
    """An adapter tuned on the emulator, renamed onto the full model: emulator block i -> full block
    ``sandwich.blocks[i]``; only tensors of adapter blocks (or of no block) are allowed."""
    rename = _renamer(emulator, dict(enumerate(sandwich.blocks)))
    pattern = layout_of(emulator).block_name
    out = {}
    for name, tensor in params.items():
        new = rename(name)
        block = pattern.search(new or "")
        if new is None or (block is not None and int(block.group(1)) not in sandwich.adapter_blocks):
            raise ConfigError(f"adapter tensor {name} lies in an emulated middle block; only adapter blocks are tuned")
        out[new] = tensor
    return out
