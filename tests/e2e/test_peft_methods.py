"""Every PEFT method, table-driven: two federated rounds from the CLI config on a tiny model, then
the exported adapter must load into a fresh base model and reproduce the trained model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedtune.adapters.adapter_model import AdapterModel, load_adapter
from fedtune.config import load_config
from fedtune.experiment import run_experiment
from fedtune.models.loading import load_model
from fedtune.server.checkpoint import load_latest
from tests.helpers.configs import PEFT_METHODS as METHODS
from tests.helpers.configs import TINY_OVERRIDES

# method id -> (overrides, a substring every trained tensor name has)


def _run(tmp_path, method: str, *extra: str, resume: bool = False):
    overrides, _ = METHODS[method]
    cfg = load_config(
        "examples/tiny.yaml",
        [
            *TINY_OVERRIDES,
            *overrides,
            "federation.rounds=2",
            "training.lr=2e-2",
            "evaluation.exact_match=false",
            f"output.dir={tmp_path}",
            f"output.name={method}",
            *extra,
        ],
    )
    return cfg, run_experiment(cfg, resume=resume)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_federated_and_round_trips_through_export(tmp_path, method):
    cfg, result = _run(tmp_path, method)
    run_dir, marker = result.run_dir, METHODS[method][1]
    # the adapter changed, and only adapter tensors travelled
    initial = AdapterModel(load_model(cfg.model.name).model, cfg.adapter, seed=cfg.seed).get_state()
    final = result.state.params
    assert final.keys() == initial.keys() and all(marker in k for k in final)
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    # trainable parameters and bytes are reported, and the bytes are those tensors (+ a small header)
    n = sum(v.numel() for v in final.values())
    assert result.summary["trainable_params"] == n
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    for rec in rounds:
        per_update = rec["bytes_up"] / len(rec["clients"])
        assert 4 * n <= per_update <= 4 * n + 64 * len(final) + 2048
    # resume state: the checkpoint holds exactly the final params
    ckpt = load_latest(run_dir, result.state.algorithm)
    assert all(torch.equal(ckpt.params[k], final[k]) for k in final)
    # export: a fresh base model with the exported adapter computes what the trained adapter model computes
    trained = AdapterModel(load_model(cfg.model.name).model, cfg.adapter, seed=cfg.seed)
    trained.set_state(final)
    loaded = load_adapter(
        AutoModelForCausalLM.from_pretrained(load_model(cfg.model.name).path), run_dir / "final_adapter"
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    trained.model.eval()
    with torch.no_grad():
        expected, got = trained.model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_exported_files_are_the_adapter_only(tmp_path):
    _, result = _run(tmp_path, "bottleneck")
    files = sorted(p.name for p in (result.run_dir / "final_adapter").iterdir())
    assert files == ["adapter_model.safetensors", "fedtune_adapter.json"]
    saved = load_file(result.run_dir / "final_adapter" / "adapter_model.safetensors")
    assert saved.keys() == result.state.params.keys()


def test_bitfit_on_a_bias_free_model_says_so(tmp_path):
    from fedtune.core.errors import ConfigError

    with pytest.raises(ConfigError, match="bitfit trains only bias terms.*has none"):
        _run(tmp_path, "bitfit", "model.name=tiny-llama")


def test_lora_only_options_are_rejected_for_other_methods():
    from fedtune.core.errors import ConfigError

    with pytest.raises(ConfigError, match="aggregation.lora=exact is LoRA-aware"):
        load_config(None, ["adapter.method=ia3", "aggregation.lora=exact"])
    with pytest.raises(ConfigError, match="client_ranks.*needs method lora"):
        load_config(None, ["adapter.method=bottleneck", "adapter.client_ranks=[2,4]"])
    with pytest.raises(ConfigError, match="target_modules does not apply to method 'prompt_tuning'"):
        load_config(None, ["adapter.method=prompt_tuning", "adapter.target_modules=[q_proj]"])


@pytest.mark.parametrize("method", list(METHODS))
def test_method_resumes_bit_identically(tmp_path, method):
    """Stop after round 1, resume to round 2: the same adapter as two rounds straight."""
    _, straight = _run(tmp_path, method, "output.name=straight")
    _run(tmp_path, method, "output.name=split", "federation.rounds=1")
    resumed = _run(tmp_path, method, "output.name=split", resume=True)[1].state.params
    assert resumed.keys() == straight.state.params.keys()
    assert all(torch.equal(resumed[k], straight.state.params[k]) for k in resumed)


def test_lora_on_the_top_block_only_runs_federated(tmp_path):
    from tests.helpers.cli import run_tiny

    code, out = run_tiny(tmp_path, "adapter.layers=[-1]", "federation.rounds=1")
    assert code == 0, out
    saved = load_file(tmp_path / "tiny" / "final_adapter" / "adapter_model.safetensors")
    assert saved and all(".layers.1." in k for k in saved)  # tiny-llama's 2 blocks: -1 is block 1
