"""Next-token losses: the fused head path gives the plain path's loss and gradients on real PEFT models."""

from __future__ import annotations

import pytest
import torch

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.config import AdapterConfig
from fedtune.data.tokenize import IGNORE
from fedtune.losses import token_loss_sum
from fedtune.models.head_loss import plain_head


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :9] = IGNORE  # prompts
    labels[1, 15:] = IGNORE  # a short answer: position 15.. kept for other rows only
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0
    labels[2, 20:] = IGNORE  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(
    "adapter",
    [
        AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]),
        AdapterConfig(method="prompt_tuning", num_virtual_tokens=5),
    ],
    ids=["lora", "prompt_tuning"],
)
def test_fused_loss_matches_the_plain_loss_and_its_gradients(tiny, adapter):
    wrapped = AdapterModel(tiny.model, adapter, seed=0)
    assert plain_head(wrapped.model) is tiny.model.lm_head  # the fused path runs
    batch = _batch(tiny.model.config.vocab_size)
    params = list(wrapped.params.values())
    out = {}
    for fused in (False, True):
        loss, n = token_loss_sum(wrapped.model, batch, fused=fused)
        out[fused] = loss, n, torch.autograd.grad(loss, params)
    (plain, n_plain, g_plain), (fused, n_fused, g_fused) = out[False], out[True]
    assert n_fused == n_plain == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(fused, plain, rtol=1e-6, atol=0)
    grads = torch.cat([g.flatten() for g in g_plain]), torch.cat([g.flatten() for g in g_fused])
    assert grads[0].norm() > 0
    assert (grads[1] - grads[0]).norm() <= 1e-5 * grads[0].norm()


def test_a_head_it_cannot_bypass_takes_the_plain_path(tiny):
    wrapped = AdapterModel(tiny.model, AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    batch = _batch(tiny.model.config.vocab_size)
    tiny.model.config.model_type = "gemma2"  # its logits are capped after the head
    assert torch.equal(token_loss_sum(wrapped.model, batch)[0], token_loss_sum(wrapped.model, batch, fused=False)[0])
