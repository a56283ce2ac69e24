"""What a client's round costs: activations measured through autograd, FLOPs from the model's own matrices."""

from __future__ import annotations

import gc
from dataclasses import replace

import torch

from fedtune.client.cost import TRAINING, ActivationMeter, FlopModel, parameter_bytes
from fedtune.data.tokenize import IGNORE
from fedtune.losses import token_loss_sum


def _batch(b: int, t: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 200, (b, t), generator=torch.Generator().manual_seed(b * t))
    labels = ids.clone()
    labels[:, : t // 2] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.long), "labels": labels}


def test_activation_bytes_are_what_autograd_keeps_and_grow_with_the_batch(tiny_adapter):
    model = tiny_adapter.model
    model.train()
    meter = ActivationMeter(model.parameters())
    with torch.no_grad(), meter.measure():
        token_loss_sum(model, _batch(2, 16))
    assert meter.peak == 0  # nothing is kept without a backward to come
    sizes = []
    for b in (1, 2, 4):
        meter = ActivationMeter(model.parameters())
        with meter.measure():
            loss, _ = token_loss_sum(model, _batch(b, 16))
        loss.backward()
        sizes.append(meter.peak)
    assert 0 < sizes[0] < sizes[1] < sizes[2] and sizes[2] > 3 * sizes[0]
    counting_weights = ActivationMeter([])  # the weights autograd keeps too, if they were not excluded
    with counting_weights.measure():
        token_loss_sum(model, _batch(4, 16))[0].backward()
    assert counting_weights.peak > sizes[2]


def test_a_graph_measured_and_dropped_without_backward_is_freed(tiny_adapter):
    """A split client drops the kept front of a round cut short: no tensor of that graph may stay behind."""
    model = tiny_adapter.model
    model.train()
    meter = ActivationMeter(model.parameters())

    def tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)

    before = tensors()
    with meter.measure():
        loss, _ = token_loss_sum(model, _batch(2, 16))
    assert meter.peak > 0 and tensors() > before
    del loss
    assert tensors() == before


def test_tied_weights_count_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert parameter_bytes([emb.weight, head.weight]) == 10 * 4 * 4


def test_flops_come_from_each_blocks_matrices_and_scale_with_tokens(tiny_adapter):
    model = FlopModel.of_model(tiny_adapter.model)
    blocks = tiny_adapter.model.get_base_model().model.layers
    hidden, vocab = 64, tiny_adapter.model.get_base_model().config.vocab_size
    dense = sum(p.numel() for n, p in blocks[0].named_parameters() if p.ndim == 2 and "lora_" not in n)
    assert model.block_macs[0] == dense and model.head_macs == hidden * vocab
    one = model.forward([0], 1, 8)
    assert one == 8 * (2 * dense + 2 * hidden * 9)
    assert model.forward([0, 1], 2, 8) == 2 * 2 * one  # two blocks, twice the sequences
    batch = _batch(2, 8)
    scored = 2 * int((batch["labels"][:, 1:] != IGNORE).any(dim=0).sum())
    assert model.training(batch) == TRAINING * model.forward(range(2), 2, 8, scored)
    batch["labels"][1, 6:] = IGNORE  # row 1's answer ends early: the plain head still runs there
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert targets < scored == 2 * int((batch["labels"][:, 1:] != IGNORE).any(dim=0).sum())
    fused = replace(model, head_at_targets=True)  # the fused loss's head runs at the targets alone
    assert fused.training(batch) == TRAINING * model.forward(range(2), 2, 8, targets)
    assert FlopModel.of_model(torch.nn.Linear(2, 2)) is None  # no known block layout: no count


def test_a_rounds_input_tokens_are_the_non_padding_positions_of_every_micro_batch_trained(tiny_adapter):
    from fedtune.client.local_training import train_locally

    g = torch.Generator().manual_seed(0)
    batches = []
    for lengths in ([5, 3], [7, 7, 2]):
        ids = torch.randint(3, 200, (len(lengths), 7), generator=g)
        mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    params = list(tiny_adapter.params.values())
    result = train_locally(tiny_adapter.model, params, batches, 1, lambda _s: 1e-3, 0.0)
    assert result.input_tokens == 5 + 3 + 7 + 7 + 2


def test_a_client_holds_each_trainable_tensors_gradient_and_optimizer_state():
    """Full tuning of a block costs its gradient and AdamW's two moments on top of the weights (plain SGD: the
    gradient alone); LoRA's few tensors add next to nothing."""
    from fedtune.adapters.adapter_model import AdapterModel
    from fedtune.client.trainer import LocalTrainer
    from fedtune.config import AdapterConfig, TrainingConfig
    from fedtune.models.tiny import build_tiny_llama

    held = {}
    for method in ("lora", "blocks"):
        adapter = AdapterModel(build_tiny_llama(layers=2)[0], AdapterConfig(method=method, layers=[0]), seed=0)
        weights = parameter_bytes(adapter.model.parameters())
        trained = sum(p.numel() * 4 for p in adapter.params.values())
        for optimizer, slots in (("adamw", 3), ("sgd", 1)):
            trainer = LocalTrainer(TrainingConfig(optimizer=optimizer), 1, 0, 0)
            held[method, optimizer] = trainer.held_bytes(adapter)
            assert held[method, optimizer] == weights + slots * trained
    assert held["blocks", "adamw"] > 1.4 * held["lora", "adamw"]  # one of two blocks, three times over
