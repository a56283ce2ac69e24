"""Quantised bases (QLoRA): the frozen base's linear layers stored by bitsandbytes in 4-bit NF4 or 8-bit.

QLoRA (Dettmers et al., NeurIPS 2023) keeps the base's weights W in 4-bit NormalFloat with double-quantised
block scales and computes y = dequant(W) x + (α/r) B A x in the compute dtype, training only the adapter.
LLM.int8() (Dettmers et al., NeurIPS 2022) keeps W in int8 with outlier columns in 16-bit. The layers come
from bitsandbytes through transformers' ``BitsAndBytesConfig``; the adapter and the head stay unquantised,
so what a client trains and sends is the same full-precision adapter a plain base would have. Whether the
installed bitsandbytes can run a kind on a device is found out by running one small layer forward and
backward before the model loads (``check_support``): its CPU backend runs both kinds since 0.46.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import warnings

import torch

from fedtune.core.errors import ModelLoadError

KINDS = ("nf4", "int8")
_INSTEAD = (
    "Instead: model.dtype=bfloat16 halves the base's memory without bitsandbytes, or run on a device "
    "bitsandbytes supports (model.device=cuda)"
)


def bnb_config(kind: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``kind`` (nf4: QLoRA's double-quantised 4-bit NormalFloat)."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization={kind!r}: one of none, {', '.join(KINDS)}")


def quiet_int8() -> None:
    """LLM.int8()'s matmul warns at every call that float32 inputs are cast to float16: said once in the docs."""
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)


def check_support(kind: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """ModelLoadError, naming what to use instead, unless bitsandbytes is installed and runs one ``kind`` layer
    forward and backward (to its input, as LoRA's does) on ``device``."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # not installed, or its native library failed to load
        raise ModelLoadError(
            f"model.quantization={kind} needs bitsandbytes: pip install 'fedtune[quantised]' ({exc}). {_INSTEAD}."
        ) from exc
    version = importlib.metadata.version("bitsandbytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "nf4":
                layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer = layer.to(device)
            x = torch.randn(2, 64, device=device, dtype=compute_dtype, requires_grad=True)
            layer(x).float().sum().backward()
            if x.grad is None or not bool(torch.isfinite(x.grad).all()):
                raise RuntimeError("no finite gradient reached the layer's input")
    except Exception as exc:  # a backend without the kernel raises NotImplementedError, RuntimeError, ...
        raise ModelLoadError(
            f"model.quantization={kind}: bitsandbytes {version} cannot run {kind} layers on {device} here "
            f"({type(exc).__name__}: {exc}). {_INSTEAD}."
        ) from exc


def release_file(model: torch.nn.Module) -> None:
    """Give ``model``'s unquantised parameters (embeddings, norms, head) memory of their own and hand freed heap
    back: loaded as views of the memory-mapped checkpoint they keep the whole file mapped, and every weight
    page quantisation read stays resident (on the bundled model 0.5 GB of a 1.3 GB process)."""
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or from_bitsandbytes(p):
            continue
        seen.add(id(p))  # a tied weight is one Parameter: cloned once, still tied
        p.data = p.data.clone()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: return the heap quantisation freed
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def from_bitsandbytes(obj: object) -> bool:
    """Whether ``obj`` (a parameter or a module) is one of bitsandbytes' own types (a quantised weight or layer)."""
    return type(obj).__module__.startswith("bitsandbytes")


def logical_numel(p: torch.Tensor) -> int:
    """The values a parameter stands for: a 4-bit one packs two into each byte of a flat tensor, its shape
    kept in its quantisation state."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()
