import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.config import AdapterConfig
from fedtune.core.errors import ConfigError
from fedtune.models.loading import load_model


def test_state_names_are_peft_keys_and_swap_in_place(tiny_adapter):
    state = tiny_adapter.get_state()
    assert all(".lora_" in k and ".default." not in k for k in state)
    assert tiny_adapter.num_trainable == sum(v.numel() for v in state.values())
    new = {k: torch.randn_like(v) for k, v in state.items()}
    ptrs = {k: p.data_ptr() for k, p in tiny_adapter.params.items()}
    tiny_adapter.set_state(new)
    assert all(torch.equal(tiny_adapter.params[k], new[k]) for k in new)
    assert ptrs == {k: p.data_ptr() for k, p in tiny_adapter.params.items()}  # no new tensors: swapped in place


def test_set_state_rejects_wrong_keys_and_shapes(tiny_adapter):
    state = tiny_adapter.get_state()
    k = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        tiny_adapter.set_state({kk: v for kk, v in state.items() if kk != k})
    with pytest.raises(ValueError, match="shape"):
        tiny_adapter.set_state({**state, k: torch.zeros(1)})


def test_initial_adapter_is_a_function_of_the_seed():
    a = AdapterModel(load_model("tiny-llama").model, AdapterConfig(r=4), seed=3).get_state()
    b = AdapterModel(load_model("tiny-llama").model, AdapterConfig(r=4), seed=3).get_state()
    c = AdapterModel(load_model("tiny-llama").model, AdapterConfig(r=4), seed=4).get_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_export_loads_with_plain_peft(tiny, tmp_path):
    adapter = AdapterModel(tiny.model, AdapterConfig(r=4), seed=0, base_path=tiny.path)
    trained = {k: torch.randn_like(v) * 0.1 for k, v in adapter.get_state().items()}
    adapter.save(tmp_path / "ad", trained)
    base = AutoModelForCausalLM.from_pretrained(tiny.path)
    loaded = PeftModel.from_pretrained(base, tmp_path / "ad")
    sd = {n.replace(".default.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert sd.keys() == trained.keys()
    assert all(torch.equal(sd[k], trained[k]) for k in trained)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapter.model(ids).logits, atol=1e-6)


def test_bad_target_modules_name_the_key_and_list_options(tiny):
    with pytest.raises(ConfigError, match=r"adapter.target_modules=\['nope'\].*Linear layers it has: .*q_proj"):
        AdapterModel(tiny.model, AdapterConfig(target_modules=["nope"]), seed=0)


def test_ffa_freezes_a_and_exports_it(tiny, tmp_path):
    adapter = AdapterModel(tiny.model, AdapterConfig(r=4), seed=0, base_path=tiny.path, freeze_a=True)
    assert adapter.params and all(".lora_B." in k for k in adapter.params)
    a_init = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if ".lora_A." in n}
    adapter.save(tmp_path / "ad", {k: torch.randn_like(v) for k, v in adapter.get_state().items()})
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {k for k in saved if ".lora_A." in k} == {n.replace(".default.", ".") for n in a_init}
    assert all(torch.equal(saved[n.replace(".default.", ".")], v) for n, v in a_init.items())


def test_one_model_holds_an_adapter_per_rank(tiny):
    adapter = AdapterModel(tiny.model, AdapterConfig(r=8), seed=0, extra_ranks=[2, 4, 8])
    ids = torch.tensor([[5, 6, 7, 8]])
    shapes = {}
    for r in (2, 4, 8):
        adapter.activate(r)
        state = adapter.get_state()
        shapes[r] = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
        assert all(p.requires_grad for p in adapter.params.values())
        assert sum(p.requires_grad for p in adapter.model.parameters()) == len(adapter.params)
    assert shapes == {2: {2}, 4: {4}, 8: {8}}
    adapter.activate(2)
    with torch.no_grad():
        before = adapter.model(ids).logits
        adapter.activate(8)  # writing the rank-8 adapter must not change what rank 2 computes
        adapter.set_state({k: torch.randn_like(v) for k, v in adapter.get_state().items()})
        adapter.activate(2)
        assert torch.equal(adapter.model(ids).logits, before)
    with pytest.raises(ValueError, match="no adapter of rank 3"):
        adapter.activate(3)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_confined_to_some_blocks_trains_only_there_and_exports_so(tmp_path, dora):
    from fedtune.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama(layers=4)
    adapter = AdapterModel(model, AdapterConfig(r=2, dora=dora, layers=[0, -1]), seed=0)
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in adapter.params}
    assert blocks == {0, 3}  # -1: the top block
    state = {k: torch.randn_like(v) * 0.1 for k, v in adapter.get_state().items()}
    adapter.save(tmp_path / "a", state)
    fresh, _ = build_tiny_llama(layers=4)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "a")  # peft reads layers_to_transform back
    got = {n.replace(".default.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_blocks_outside_the_model_or_other_methods_are_refused():
    from fedtune.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama(layers=4)
    with pytest.raises(ConfigError, match=r"has 4 blocks \(0..3, or -4..-1 from the top\)"):
        AdapterModel(model, AdapterConfig(r=2, layers=[0, 4]), seed=0)
    with pytest.raises(ConfigError, match="each named once"):
        AdapterModel(model, AdapterConfig(r=2, layers=[3, -1]), seed=0)
    with pytest.raises(ValueError, match="applies to methods lora, ia3, bottleneck, bitfit, blocks"):
        AdapterConfig(method="prompt_tuning", layers=[1])


@pytest.mark.parametrize("method", ["ia3", "bottleneck", "bitfit", "blocks"])
def test_other_methods_confined_to_some_blocks_train_only_there_and_export_so(tmp_path, method):
    """adapter.layers confines every layered method: its tensors lie in those blocks alone, only they train,
    and the exported adapter loads onto a fresh base to the same outputs."""
    from fedtune.adapters.adapter_model import load_adapter
    from fedtune.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama(layers=4, bias=True)
    adapter = AdapterModel(model, AdapterConfig(method=method, layers=[1, -1]), seed=0)
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in adapter.params}
    assert blocks == {1, 3} and all(".layers." in k for k in adapter.params)
    assert sum(p.requires_grad for p in adapter.model.parameters()) == len(adapter.params)
    everywhere = AdapterModel(build_tiny_llama(layers=4, bias=True)[0], AdapterConfig(method=method), seed=0)
    assert len(everywhere.params) > len(adapter.params)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter.get_state().items()}
    adapter.save(tmp_path / "a", state)
    ids = torch.randint(4, 200, (2, 9))
    with torch.no_grad():
        want = adapter.model.eval()(input_ids=ids).logits
        got = load_adapter(build_tiny_llama(layers=4, bias=True)[0], tmp_path / "a")(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6)
    if method in ("bitfit", "blocks"):  # the adapter is the base's own tensors: counted once
        assert adapter.num_total == sum(p.numel() for p in build_tiny_llama(layers=4, bias=True)[0].parameters())
