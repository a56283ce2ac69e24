"""KD's client-side steps: scoring the public slice, and what it costs."""

from __future__ import annotations

import torch

from fedtune.client.cost import FlopModel
from fedtune.data.formats import from_instruction
from fedtune.data.tokenize import Encoder
from fedtune.paradigms.kd.distill import score_public
from fedtune.paradigms.kd.distributions import score
from fedtune.paradigms.kd.public import PublicSet


def test_scoring_the_public_slice_reports_one_forward_pass_of_flops_per_batch(tiny, tiny_adapter):
    words = ("apple", "river", "stone", "cloud", "music")
    examples = [from_instruction(f"Say {w}.", w * (i + 1)) for i, w in enumerate(words)]
    encoded, _ = Encoder(tiny.tokenizer, "chat", None, 64).encode_all(examples)
    public = PublicSet(examples, encoded, "test", "d1g35t")
    pad, rows = tiny.tokenizer.pad_token_id, torch.tensor([4, 0, 2])
    top, flops = score_public(tiny_adapter, public, rows, 3, 2, pad)
    cost = FlopModel.of_model(tiny_adapter.model)
    batches = [public.batch(rows[:2], pad), public.batch(rows[2:], pad)]
    assert flops == sum(cost.inference(b) for b in batches) > 0
    assert flops == sum(cost.training(b) for b in batches) / 3  # a forward pass, no backward
    assert torch.equal(top.ids, torch.cat([score(tiny_adapter.model, b, 3).ids for b in batches]))
    assert score_public(tiny_adapter, public, rows[:0], 3, 2, pad)[1] == 0.0
