"""The model cut into parts: the same loss and gradients as the whole model, for each supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.split import Cut, SplitModel, full_names
from fedtune.config import AdapterConfig
from fedtune.core.errors import ConfigError
from fedtune.data.tokenize import IGNORE
from fedtune.losses import token_loss_sum
from fedtune.models.loading import load_model

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # peft on GPT-2's Conv1D


def _llama() -> AdapterModel:
    return AdapterModel(load_model("tiny-llama-deep").model, AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]), 0)


def _gpt2() -> AdapterModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return AdapterModel(GPT2LMHeadModel(config), AdapterConfig(r=4, target_modules=["c_attn"]), 0)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 250, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding, as collate makes it
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("cut", [Cut(1, 1, "u"), Cut(2, 1, "u"), Cut(2, 0, "vanilla"), Cut(3, 0, "vanilla")])
def test_parts_chained_by_their_cut_tensors_give_the_whole_models_loss_and_gradients(build, cut):
    adapter = build()
    for p in adapter.params.values():  # LoRA's B starts at zero: make every tensor matter
        p.data.normal_(0, 0.1)
    batch = _batch()
    adapter.model.train()
    loss, positions = token_loss_sum(adapter.model, batch, fused=False)  # the plain path: split's, to the bit
    loss.backward()
    reference = {k: p.grad.clone() for k, p in adapter.params.items()}

    split = SplitModel(adapter.model, cut)
    full = full_names(adapter.model, adapter.params)
    client, server = split.partition(adapter.params)
    assert client and server and not set(client) & set(server)
    mine = {k: adapter.params[k].detach().clone().requires_grad_(True) for k in adapter.params}
    c = {full[k]: mine[k] for k in client}
    s = {full[k]: mine[k] for k in server}
    mask, labels = batch["attention_mask"], batch["labels"]
    h1 = split.front(c, batch["input_ids"], mask)  # (B, T, H): what crosses the first cut
    x1 = h1.detach().requires_grad_(True)
    if cut.shape == "u":
        h2 = split.middle(s, x1, mask)
        x2 = h2.detach().requires_grad_(True)
        got, n = split.back_loss(c, x2, mask, labels, split.layers - cut.back)
        got.backward()
        h2.backward(x2.grad)  # the gradient that crosses the second cut
    else:
        got, n = split.back_loss(s, x1, mask, labels, cut.front)
        got.backward()
    h1.backward(x1.grad)  # the gradient that crosses the first cut
    assert n == positions and torch.equal(got.detach(), loss.detach())
    assert all(torch.equal(mine[k].grad, reference[k]) for k in reference)  # to the bit, on CPU


def test_blocks_go_to_the_side_the_cut_gives_them():
    split = SplitModel(_llama().model, Cut(1, 1, "u"))
    assert [split.cut.side(b, split.layers) for b in range(4)] == ["client", "server", "server", "client"]
    client, server = split.partition(
        [
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight",
        ]
    )
    assert len(client) == len(server) == 1 and ".layers.3." in client[0]
    with pytest.raises(ConfigError, match="not inside a decoder block"):
        split.partition(["base_model.model.lm_head.weight"])


@pytest.mark.parametrize(
    "cut, why",
    [
        (Cut(2, 2, "u"), "leaves no block of the model's 4"),
        (Cut(4, 0, "vanilla"), "leaves no block"),
        (Cut(0, 1, "u"), "at least 1 block"),
        (Cut(1, 0, "u"), "at least 1 block"),
        (Cut(1, 1, "vanilla"), "applies to split.shape=u"),
    ],
)
def test_cut_points_outside_the_model_are_config_errors(cut, why):
    with pytest.raises(ConfigError, match=why):
        SplitModel(_llama().model, cut)


def test_a_model_family_without_a_known_layout_is_a_config_error_naming_the_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(ConfigError, match="model type 'bert'.*gpt2, llama"):
        SplitModel(model, Cut(1, 0, "vanilla"))
