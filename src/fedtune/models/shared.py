"""Base weights lent between processes on one machine: exported once, mapped read-only by every borrower.

A simulation's workers all hold the same frozen base model. Instead of each loading its own copy,
one process exports its base parameters as numpy arrays (``to_arrays``: views, no copy) for a
shared-memory store to hold once (Ray's object store), and each worker registers the store's
read-only mapping of them (``lend``) before it builds its model: ``load_model`` then builds the
architecture without weights and points its parameters at the lent tensors. Nothing writes to
base weights (only adapters train), so a page of them exists once on the machine however many
processes use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

_LENT: dict[str, dict[str, torch.Tensor]] = {}  # model name as given to load_model -> parameter name -> tensor
# numpy has no bfloat16: such tensors travel as their int16 bit patterns
_AS_BITS = {torch.bfloat16: torch.int16}
_FROM_BITS = {"bfloat16": torch.bfloat16}


Exported = dict[str, tuple[str, bool, np.ndarray]]  # name -> (torch dtype name, private?, array)


def to_arrays(params: Mapping[str, torch.Tensor], private: set[str] = frozenset()) -> Exported:
    """name -> (dtype, private, numpy view of the tensor): no copy, tied names share one array object.
    ``private``: names each borrower gets its own copy of, since it trains them (BitFit's biases)."""
    seen: dict[int, tuple[str, bool, np.ndarray]] = {}
    out = {}
    for name, p in params.items():
        t = p.detach()
        key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        if key not in seen:
            bits = _AS_BITS.get(t.dtype)
            seen[key] = (str(t.dtype).removeprefix("torch."), name in private, (t.view(bits) if bits else t).numpy())
        out[name] = seen[key]
    return out


def from_arrays(arrays: Exported) -> dict[str, torch.Tensor]:
    """The tensors ``to_arrays`` exported: over the same memory (read-only: never written), private ones copied."""
    made: dict[int, torch.Tensor] = {}
    out = {}
    with warnings.catch_warnings():  # a read-only array: torch cannot mark it so; base weights are never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        for name, (dtype, private, arr) in arrays.items():
            if id(arr) not in made:
                t = torch.from_numpy(arr)
                t = t.view(_FROM_BITS[dtype]) if dtype in _FROM_BITS else t
                made[id(arr)] = t.clone() if private else t
            out[name] = made[id(arr)]
    return out


def adopt(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    """Point each named parameter at the lent tensor of the same name, shape and dtype (freeing its own)."""
    for name, p in params.items():
        t = tensors.get(name)
        if t is None or t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(f"lent weights do not fit this model: {name} is {None if t is None else tuple(t.shape)}")
    for name, p in params.items():
        p.data = tensors[name]


def lend(model_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """From now on ``load_model(model_name)`` in this process builds its model over these tensors."""
    _LENT[model_name] = tensors


def lent(model_name: str) -> dict[str, torch.Tensor] | None:
    return _LENT.get(model_name)
