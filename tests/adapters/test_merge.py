"""A final adapter folded into its base: plain transformers loads it and gives the adapter's logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedtune.adapters.adapter_model import AdapterModel, load_adapter
from fedtune.adapters.merge import adapter_folder, merged_model, save_merged
from fedtune.config import AdapterConfig
from fedtune.core.errors import ConfigError
from fedtune.models.loading import load_model

IDS = torch.tensor([[1, 40, 50, 60, 70, 80], [3, 9, 27, 81, 12, 5]])


def _trained_adapter(tmp_path, variant, **cfg):
    loaded = load_model(variant)
    adapter = AdapterModel(loaded.model, AdapterConfig(**cfg), seed=0)
    state = {k: torch.randn_like(v) * 0.3 for k, v in adapter.get_state().items()}  # as if trained
    adapter.save(tmp_path / "final_adapter", state)
    return loaded.tokenizer


@pytest.mark.parametrize(
    ("variant", "cfg"),
    [
        ("tiny-llama", {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        ("tiny-llama", {"method": "lora", "r": 4, "dora": True}),
        ("tiny-llama", {"method": "ia3"}),
        ("tiny-llama", {"method": "ia3", "layers": [-1]}),
        ("tiny-llama-bias", {"method": "bitfit"}),
        ("tiny-llama", {"method": "blocks", "layers": [0]}),
    ],
)
def test_the_merged_model_gives_the_adapters_logits_in_plain_transformers(tmp_path, variant, cfg):
    tokenizer = _trained_adapter(tmp_path, variant, **cfg)
    folder = adapter_folder(tmp_path / "final_adapter")
    with torch.no_grad():
        expected = load_adapter(load_model(variant).model, folder).eval()(input_ids=IDS).logits
        out = tmp_path / "merged"
        save_merged(merged_model(load_model(variant).model, folder), tokenizer, out)
        plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no fedtune, no peft
        got = plain(input_ids=IDS).logits
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    base = load_model(variant).model.eval()(input_ids=IDS).logits
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changed something


@pytest.mark.parametrize("cfg", [{"method": "bottleneck"}, {"method": "prompt_tuning"}])
def test_adapters_with_no_place_in_the_architecture_are_refused_with_how_to_load_them(tmp_path, cfg):
    _trained_adapter(tmp_path, "tiny-llama", **cfg)
    with pytest.raises(ConfigError, match="cannot be merged; load it with"):
        merged_model(load_model("tiny-llama").model, adapter_folder(tmp_path / "final_adapter"))


def test_gguf_export_loads_back_with_the_same_logits(tmp_path):
    from fedtune.models.gguf_export import write_gguf

    tokenizer = _trained_adapter(tmp_path, "tiny-llama", method="lora", r=4)
    model = merged_model(load_model("tiny-llama").model, adapter_folder(tmp_path / "final_adapter")).eval()
    path = write_gguf(model, tokenizer, tmp_path / "gguf" / "model.gguf")
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        assert torch.allclose(back(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)


def test_named_adapters_must_be_chosen(tmp_path):
    (tmp_path / "final_adapter" / "client-0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="choose one with --adapter"):
        adapter_folder(tmp_path / "final_adapter")
    with pytest.raises(ConfigError, match="has no adapter 'x'; it has: client-0"):
        adapter_folder(tmp_path / "final_adapter", "x")
    with pytest.raises(ConfigError, match="has not finished"):
        adapter_folder(tmp_path / "nothing")
