"""A Llama-family transformers model written as GGUF (llama.cpp's format) with the ``gguf`` package.

Float32 tensors under llama.cpp's names (``gguf.get_tensor_name_map``), with the query and key
projections' rows reordered as llama.cpp's rotary embedding expects (its converter's permutation,
which transformers' GGUF loader undoes), the architecture's hyper-parameters, and a GPT-2-style BPE
tokenizer (tokens, types, merges, special ids, chat template). Loading the file back with
``from_pretrained(..., gguf_file=...)`` gives the same logits (tested). ``pre``: llama.cpp's
pre-tokenizer name, taken from the base model's own GGUF where it came from one (SmolLM2: "smollm").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.core.errors import ConfigError

ARCHITECTURES = ("llama",)


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, pre: str = "default") -> Path:
    import gguf

    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF export covers {', '.join(ARCHITECTURES)} models; this one is {cfg.model_type!r}: use the merged "
            "safetensors folder, or llama.cpp's convert_hf_to_gguf.py on it"
        )
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, pre)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reads the tied head from token_embd
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for tensor {name!r}")
        data = tensor.detach().to(torch.float32).cpu()
        if name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, kv)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from (pairs interleaved as HF's rotate_half halves) to llama.cpp's order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, vocab_size: int, pre: str) -> None:
    import gguf

    if (
        getattr(tokenizer, "backend_tokenizer", None) is None
        or tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE"
    ):
        raise ConfigError("GGUF export writes byte-level BPE tokenizers (GPT-2 style); this tokenizer is another kind")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t for t, i in tokenizer.get_added_vocab().items()}
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(
                gguf.TokenType.CONTROL
                if tok in special
                else gguf.TokenType.USER_DEFINED
                if tok in added
                else gguf.TokenType.NORMAL
            )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads merges, special ids and the chat template from files
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def source_pre(name: str, gguf_file: str | None = None) -> str:
    """llama.cpp's pre-tokenizer name in the GGUF the base model came from (the bundled SmolLM2's, a local
    .gguf), or "default" for a model that did not come from one."""
    import gguf

    from fedtune.models.loading import SMOLLM2_ALIASES, bundled_gguf

    if name.strip().lower() in SMOLLM2_ALIASES:
        source: Path | None = bundled_gguf()
    elif Path(name).expanduser().suffix == ".gguf":
        source = Path(name).expanduser()
    elif gguf_file and (Path(name).expanduser() / gguf_file).is_file():
        source = Path(name).expanduser() / gguf_file
    else:
        return "default"
    field = gguf.GGUFReader(str(source)).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else "default"
