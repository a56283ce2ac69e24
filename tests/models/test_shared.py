"""Lent base weights: exported without a copy, and a model built over them is the model loaded from disk."""

from __future__ import annotations

import pytest
import torch

from fedtune.models import shared
from fedtune.models.loading import load_model
from fedtune.models.shared import adopt, from_arrays, lend, to_arrays


@pytest.fixture(autouse=True)
def _nothing_lent(monkeypatch):
    monkeypatch.setattr(shared, "_LENT", {})


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_export_and_import_share_memory_tie_names_and_keep_bf16_bits():
    w = torch.randn(4, 3)
    bf = torch.randn(5).to(torch.bfloat16)
    bias = torch.zeros(2)
    arrays = to_arrays({"embed": w, "head": w, "norm": bf, "bias": bias}, private={"bias"})
    assert arrays["embed"] is arrays["head"]  # tied names: one array, stored once
    back = from_arrays(arrays)
    assert _ptr(back["embed"]) == _ptr(w) and back["embed"] is back["head"]
    assert back["norm"].dtype == torch.bfloat16 and torch.equal(back["norm"], bf)
    assert torch.equal(back["bias"], bias) and _ptr(back["bias"]) != _ptr(bias)  # a private copy to train


def test_a_model_built_over_lent_weights_is_the_loaded_model_without_a_copy(model_cache):
    own = load_model("tiny-llama").model
    params = dict(own.named_parameters(remove_duplicate=False))
    lend("tiny-llama", from_arrays(to_arrays(params)))
    borrowed = load_model("tiny-llama").model
    for name, p in borrowed.named_parameters(remove_duplicate=False):
        assert _ptr(p) == _ptr(params[name]), name  # the same memory, not a copy
    assert not borrowed.training and borrowed.config.use_cache is False
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(borrowed(input_ids=ids).logits, own(input_ids=ids).logits)


def test_lent_weights_that_do_not_fit_are_refused():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="do not fit this model: w is \\(2, 3\\)"):
        adopt({"w": p}, {"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="w is None"):
        adopt({"w": p}, {})
    adopt({"w": p}, {"w": torch.ones(3, 2)})
    assert torch.equal(p, torch.ones(3, 2))
