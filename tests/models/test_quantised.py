"""Quantised bases (model.quantization): bitsandbytes' layers under the adapter, and clear refusals."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedtune.client.cost import FlopModel
from fedtune.core.errors import ModelLoadError
from fedtune.models import quantised
from fedtune.models.loading import load_model
from tests.helpers.cli import read_metrics, run_tiny

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the dev install has it)"
)


def test_without_bitsandbytes_the_error_says_how_to_install_it_and_what_to_use_instead(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ModelLoadError, match=r"pip install 'fedtune\[quantised\]'.*model.dtype=bfloat16"):
        quantised.check_support("nf4", torch.device("cpu"), torch.float32)


@needs_bnb
def test_a_backend_without_the_kernel_is_refused_naming_the_version_and_what_to_use(monkeypatch):
    import bitsandbytes as bnb

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this CPU")

    monkeypatch.setattr(bnb.nn, "Linear4bit", no_kernel)
    with pytest.raises(ModelLoadError, match=r"bitsandbytes \S+ cannot run nf4 layers on cpu.*no 4-bit kernel"):
        quantised.check_support("nf4", torch.device("cpu"), torch.float32)
    with pytest.raises(ModelLoadError, match="cannot run nf4"):
        load_model("tiny-llama", quantization="nf4")


@needs_bnb
@pytest.mark.parametrize("kind, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_a_quantised_base_stores_its_linear_layers_in_bitsandbytes_close_to_the_full_one(kind, layer):
    full = load_model("tiny-llama").model
    q = load_model("tiny-llama", quantization=kind).model
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == layer
    assert type(q.lm_head) is torch.nn.Linear  # the head stays unquantised
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(input_ids=ids).logits, q(input_ids=ids).logits
    assert not torch.equal(a, b) and float((a - b).abs().max()) < 0.25 * float(a.abs().max())
    # FLOPs count the values a quantised weight stands for, not its packed bytes
    assert FlopModel.of_model(q).block_macs == FlopModel.of_model(full).block_macs
    params = {n: p for n, p in q.named_parameters()}
    assert sum(quantised.logical_numel(p) for p in params.values()) == sum(p.numel() for p in full.parameters())


@needs_bnb
def test_a_qlora_run_trains_and_its_adapter_loads_on_the_unquantised_base(tmp_path):
    code, out = run_tiny(tmp_path, "model.quantization=nf4", "training.lr=5e-3", "evaluation.every=1", name="q")
    assert code == 0, out
    metrics = read_metrics(tmp_path / "q")
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"] and all(m["dropped"] == {} for m in metrics[1:])
    run_dir = tmp_path / "q"
    cfg = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])  # full precision
    peft_model = PeftModel.from_pretrained(base, run_dir / "final_adapter")
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    trained = load_file(last / "params.safetensors")
    loaded = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert loaded.keys() == trained.keys()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], trained[k]) for k in trained)


def test_a_quantised_base_is_refused_where_it_cannot_apply(tmp_path):
    code, out = run_tiny(tmp_path, "model.quantization=nf4", "adapter.method=bitfit")
    assert code != 0 and "model.quantization=nf4 cannot be combined with adapter.method=bitfit" in out
    code, out = run_tiny(tmp_path, "model.quantization=nf4", "paradigm.name=kd")
    assert code != 0 and "a quantised base (model.quantization=nf4)" in out
    code, out = run_tiny(tmp_path, "model.quantization=int8", "privacy.dp_sgd.noise_multiplier=1.0")
    assert code != 0 and "privacy.dp_sgd" in out


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_bnb
@needs_gpu
def test_on_a_gpu_an_nf4_base_trains_from_the_same_initial_adapter_and_int8_is_refused(tmp_path):
    code, out = run_tiny(tmp_path, "model.quantization=nf4", "model.device=cuda", "training.lr=5e-3", name="gpu")
    assert code == 0, out
    metrics = read_metrics(tmp_path / "gpu")
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"] and all(m["dropped"] == {} for m in metrics[1:])
    first = load_file(sorted((tmp_path / "gpu" / "checkpoints").glob("round_*"))[0] / "params.safetensors")
    code, out = run_tiny(tmp_path, "model.quantization=nf4", "model.device=cpu", "federation.rounds=1", name="cpu")
    assert code == 0, out
    on_cpu = load_file(sorted((tmp_path / "cpu" / "checkpoints").glob("round_*"))[0] / "params.safetensors")
    assert all(torch.equal(first[k], on_cpu[k]) for k in on_cpu)  # round 0: the seeded initial adapter
    code, out = run_tiny(tmp_path, "model.quantization=int8", "model.device=cuda", name="int8")
    assert code != 0 and "use model.quantization=nf4" in out


@needs_bnb
def test_a_gguf_base_is_quantised_from_a_safetensors_copy_made_once(tmp_path, monkeypatch):
    from fedtune.models import loading
    from fedtune.models.gguf_export import write_gguf

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    plain = load_model("tiny-llama")
    path = write_gguf(plain.model, plain.tokenizer, tmp_path / "gguf" / "tiny.gguf")

    class ByteTokenizer:  # transformers reads no tokenizer from a byte-level GGUF: the tiny model's own stands in
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return plain.tokenizer

    monkeypatch.setattr(loading, "AutoTokenizer", ByteTokenizer)
    q = load_model(str(path), quantization="nf4")
    assert type(q.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    copies = list((tmp_path / "cache" / "models").glob("gguf-tiny-*"))
    assert len(copies) == 1 and (copies[0] / "config.json").is_file() and q.path == str(copies[0])
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain.model(input_ids=ids).logits, q.model(input_ids=ids).logits
    assert float((a - b).abs().max()) < 0.25 * float(a.abs().max())
    load_model(str(path), quantization="nf4")  # the copy is reused, not made again
    assert list((tmp_path / "cache" / "models").glob("gguf-tiny-*")) == copies


@needs_bnb
def test_releasing_the_checkpoint_keeps_values_and_tied_weights():
    q = load_model("tiny-llama", quantization="nf4").model  # load_model releases the file already
    before = {n: p.detach().clone() for n, p in q.named_parameters() if not quantised.from_bitsandbytes(p)}
    tied = q.lm_head.weight is q.model.embed_tokens.weight
    quantised.release_file(q)
    after = dict(q.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items())
    assert (q.lm_head.weight is q.model.embed_tokens.weight) == tied
