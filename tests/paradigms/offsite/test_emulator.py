"""The offsite-tuning emulator: uniform layer drop, a standalone model of the kept blocks, adapters renamed back."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fedtune.core.errors import ConfigError
from fedtune.models.tiny import build_tiny_llama
from fedtune.paradigms.offsite.emulator import Sandwich, build_emulator, layer_drop, to_full


@pytest.mark.parametrize(
    ("layers", "bottom", "top", "ratio", "kept"),
    [
        (30, 2, 2, 0.0, tuple(range(2, 28))),  # nothing dropped
        (30, 2, 2, 0.5, tuple(2 + round(j * 25 / 12) for j in range(13))),  # SmolLM2: 26 middle blocks -> 13
        (8, 1, 1, 0.5, (1, 3, 6)),  # 6 middle blocks -> 3: the first, the last and one between
        (8, 1, 1, 0.9, (3,)),  # one block left: the middle's centre
        (3, 1, 1, 0.5, (1,)),
    ],
)
def test_layer_drop_keeps_an_even_spread_of_the_middle(layers, bottom, top, ratio, kept):
    s = layer_drop(layers, bottom, top, ratio)
    assert s.kept == kept and len(set(s.kept)) == len(s.kept)
    assert s.blocks == (*range(bottom), *kept, *range(layers - top, layers))
    assert len(s.kept) == max(1, round((layers - bottom - top) * (1 - ratio)))


@pytest.mark.parametrize(("args", "message"), [((4, 2, 2, 0.5), "leave none"), ((8, 0, 1, 0.5), "at least 1"),
                                              ((8, 1, 1, 1.0), "must be in")])  # fmt: skip
def test_impossible_sandwiches_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        layer_drop(*args)


def _llama(layers=6):
    model, _ = build_tiny_llama(seed=1, layers=layers)
    return model.eval()


def _gpt2(layers=6):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=100, n_positions=64)).eval()


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_an_emulator_dropping_nothing_is_the_full_model(make):
    full = make()
    emulator = build_emulator(full, layer_drop(6, 1, 1, 0.0))
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        assert torch.equal(emulator(input_ids=ids).logits, full(input_ids=ids).logits)


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_an_emulator_is_a_smaller_model_of_the_kept_blocks(make):
    full = make(8)
    s = layer_drop(8, 2, 1, 0.6)  # middle 3..: blocks 2..6 -> 2 kept
    emulator = build_emulator(full, s)
    blocks = lambda m: m.model.layers if hasattr(m, "model") else m.transformer.h  # noqa: E731
    assert len(blocks(emulator)) == len(s.blocks) == 5 and emulator.config.to_dict().get("n_layer", 5) == 5
    for i, b in enumerate(s.blocks):
        ours, theirs = blocks(emulator)[i].state_dict(), blocks(full)[b].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert all(ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)  # copies: what a client is sent
    assert sum(p.numel() for p in emulator.parameters()) < sum(p.numel() for p in full.parameters())
    with torch.no_grad():
        out = emulator(input_ids=torch.tensor([[1, 2, 3]])).logits  # (1, 3, V)
    assert out.shape == (1, 3, full.config.vocab_size) and torch.isfinite(out).all()
    shared = build_emulator(full, s, share=True)
    assert blocks(shared)[0].state_dict()[next(iter(blocks(shared)[0].state_dict()))].data_ptr() == (
        blocks(full)[0].state_dict()[next(iter(blocks(full)[0].state_dict()))].data_ptr()
    )


def test_a_tuned_adapter_goes_back_to_the_full_models_blocks():
    full = _llama(8)
    s = layer_drop(8, 2, 2, 0.5)  # emulator blocks: 0, 1, (2, 5 of the middle 2..5), 6, 7
    emulator = build_emulator(full, s)
    assert s.blocks == (0, 1, 2, 5, 6, 7)
    tuned = {
        "model.layers.1.self_attn.q_proj.lora_A.weight": torch.ones(1),
        "model.layers.4.mlp.up_proj.w": torch.zeros(1),
    }
    assert set(to_full(tuned, emulator, s)) == {
        "model.layers.1.self_attn.q_proj.lora_A.weight",
        "model.layers.6.mlp.up_proj.w",
    }
    with pytest.raises(ConfigError, match="emulated middle block"):
        to_full({"model.layers.2.mlp.up_proj.w": torch.zeros(1)}, emulator, s)
    assert isinstance(s, Sandwich) and "kept" in s.describe()


def test_the_emulator_of_a_model_an_adapter_wraps_is_built_from_its_base_tensors():
    from fedtune.adapters.adapter_model import AdapterModel
    from fedtune.config import AdapterConfig

    plain = _llama(6)
    wrapped = AdapterModel(_llama(6), AdapterConfig(r=2), seed=0)
    s = layer_drop(6, 1, 1, 0.5)
    with pytest.raises(ConfigError, match="base_params"):
        build_emulator(wrapped.model, s)
    ours = build_emulator(wrapped.model, s, state=wrapped.base_params).state_dict()
    theirs = build_emulator(plain, s).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_distillation_moves_only_the_middle_and_brings_the_emulator_closer():
    from fedtune.paradigms.offsite.distill import DistillSettings, distil, kd_lm_loss

    full = _llama(6)
    s = layer_drop(6, 1, 1, 0.5)
    emulator = build_emulator(full, s)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(4, 200, (8, 32), generator=gen), torch.ones(8, 32, dtype=torch.long)) for _ in range(8)]
    held = (torch.randint(4, 200, (8, 32), generator=gen), torch.ones(8, 32, dtype=torch.long))

    def kl(model):
        with torch.no_grad():
            return float(kd_lm_loss(model(input_ids=held[0]).logits, full(input_ids=held[0]).logits, *held, 1.0))

    before = {k: v.clone() for k, v in emulator.state_dict().items()}
    start = kl(emulator)
    settings = DistillSettings(steps=60, lr=1e-3, alpha=1.0)  # random text: the LM term would pull elsewhere
    losses = distil(emulator, full, s, batches, settings)
    assert kl(emulator) < 0.5 * start and losses[-1] < losses[0]
    middle = {f"model.layers.{i}." for i in range(s.bottom, s.bottom + len(s.kept))}
    changed = {k for k, v in emulator.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(any(k.startswith(m) for m in middle) for k in changed)  # adapter blocks, head: untouched
    again = build_emulator(full, s)
    assert distil(again, full, s, batches, settings) == losses  # seeded: repeatable
    logits = torch.randn(2, 5, 7)
    ids, mask = torch.randint(0, 7, (2, 5)), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (2, 4)
    want = nll[torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()].mean()  # positions whose next token is real
    assert torch.allclose(kd_lm_loss(logits, logits, ids, mask, 0.9), 0.1 * want)  # no KL against itself


def test_hidden_state_distillation_matches_the_middles_output_on_a_schedule(monkeypatch):
    """loss=hidden (Offsite-Tuning's): the relative squared error of the hidden state entering the top adapter
    blocks falls; the learning rate follows the schedule step by step."""
    from fedtune.paradigms.offsite import distill as d

    full = _llama(6)
    s = layer_drop(6, 1, 1, 0.5)
    emulator = build_emulator(full, s)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(4, 200, (8, 32), generator=gen), torch.ones(8, 32, dtype=torch.long)) for _ in range(8)]
    ids = torch.randint(4, 200, (8, 32), generator=gen)

    def error(model):
        with torch.no_grad():
            target = full(input_ids=ids, output_hidden_states=True).hidden_states[6 - s.top]  # block 5's input
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[len(s.blocks) - s.top]
            return float((target - h).pow(2).sum() / target.pow(2).sum())

    start = error(emulator)
    lrs = []
    step = torch.optim.AdamW.step

    def spy(opt, *a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return step(opt, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    settings = d.DistillSettings(steps=40, lr=1e-3, alpha=1.0, loss="hidden", schedule="cosine", warmup_ratio=0.25)
    losses = d.distil(emulator, full, s, batches, settings)
    assert error(emulator) < 0.5 * start and abs(losses[0] - start) < 0.5 * start
    assert lrs[:3] == pytest.approx([1e-4, 2e-4, 3e-4]) and lrs[9] == pytest.approx(1e-3)  # warmup: 10 steps
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # cosine to ~0

    h_t, h_s = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    logits, tok = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    real = m.bool()
    rse = (h_t[real] - h_s[real]).pow(2).sum() / h_t[real].pow(2).sum()  # padding positions do not count
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tok[:, 1:, None])[..., 0]
    want = 0.7 * rse + 0.3 * nll[(m[:, :-1] * m[:, 1:]).bool()].mean()
    assert torch.allclose(d.hidden_lm_loss(logits, h_s, h_t, tok, m, 0.7), want)
    assert float(d.hidden_lm_loss(logits, h_t, h_t, tok, m, 1.0)) == 0.0
    other = d.DistillSettings(steps=40, lr=1e-3, alpha=1.0)  # the loss is part of what a cached distillation is
    assert d.content_key(full.state_dict(), s, other, batches) != d.content_key(full.state_dict(), s, settings, batches)


def test_a_distillation_done_before_is_loaded_not_repeated(tmp_path, monkeypatch):
    from fedtune.paradigms.offsite import distill as d

    full = _llama(6)
    s = layer_drop(6, 1, 1, 0.5)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(4, 200, (2, 16), generator=gen), torch.ones(2, 16, dtype=torch.long)) for _ in range(2)]
    settings = d.DistillSettings(steps=5, lr=1e-3)
    first = build_emulator(full, s)
    losses, hit = d.cached_distil(first, full, full.state_dict(), s, batches, settings, tmp_path)
    assert not hit and len(losses) == 5

    def no_training(*a, **k):
        raise AssertionError("distilled again")

    monkeypatch.setattr(d, "distil", no_training)
    second = build_emulator(full, s)
    again, hit = d.cached_distil(second, full, full.state_dict(), s, batches, settings, tmp_path)
    assert hit and again == losses
    ours, theirs = first.state_dict(), second.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    other = d.DistillSettings(steps=5, lr=2e-3)
    assert d.content_key(full.state_dict(), s, other, batches) != d.content_key(full.state_dict(), s, settings, batches)
    nudged = {**full.state_dict()}
    k = next(iter(nudged))
    nudged[k] = nudged[k] + 1e-6
    assert d.content_key(nudged, s, settings, batches) != d.content_key(full.state_dict(), s, settings, batches)


def _pruned_pair(mlp_keep, heads_keep):
    """A server-side pruned emulator of the 8-block tiny Llama (layer drop to 3 middle blocks), and what a client
    builds from its tensors alone."""
    from fedtune.paradigms.offsite.emulator import emulator_from, weights
    from fedtune.paradigms.offsite.prune import prune, taylor_importance

    full = _llama(8)
    s = layer_drop(8, 1, 1, 0.5)
    emulator = build_emulator(full, s)
    middle = range(s.bottom, s.bottom + len(s.kept))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 200, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long)) for _ in range(2)]
    scores = taylor_importance(emulator, middle, batches)
    prune(emulator, middle, scores, mlp_keep, heads_keep)
    client = emulator_from(full.config, s, {k: v.clone() for k, v in weights(emulator).items()})
    return full, emulator, client, scores


def test_pruning_nothing_leaves_the_emulator_as_it_was():
    full, emulator, _, _ = _pruned_pair(1.0, 1.0)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    plain = build_emulator(full, layer_drop(8, 1, 1, 0.5))
    with torch.no_grad():
        assert torch.equal(emulator(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_pruned_emulator_keeps_its_most_important_groups_and_a_client_rebuilds_it_from_its_tensors_alone():
    full, emulator, client, scores = _pruned_pair(0.5, 0.5)
    blocks = emulator.model.layers
    for i, (channels, _heads) in scores.items():
        mlp = blocks[i].mlp
        assert mlp.gate_proj.weight.shape[0] == mlp.down_proj.weight.shape[1] == 64  # of 128
        assert blocks[i].self_attn.k_proj.weight.shape[0] == 16  # one of 2 KV heads of 16 dims
        assert blocks[i].self_attn.q_proj.weight.shape[0] == 32  # its 2 query heads
        kept = set(torch.topk(channels, 64).indices.tolist())
        original = full.model.layers[layer_drop(8, 1, 1, 0.5).blocks[i]].mlp.gate_proj.weight
        rows = {j for j in range(128) if any(torch.equal(original[j], r) for r in mlp.gate_proj.weight)}
        assert rows == kept  # the top half by importance, rows unchanged
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        assert torch.equal(client(input_ids=ids).logits, emulator(input_ids=ids).logits)


def test_a_client_refuses_shapes_that_are_no_pruning_of_its_blocks():
    from fedtune.paradigms.offsite.emulator import emulator_from, weights

    full, emulator, _, _ = _pruned_pair(0.5, 1.0)
    sent = {k: v.clone() for k, v in weights(emulator).items()}
    s = layer_drop(8, 1, 1, 0.5)
    bad = dict(sent)
    bad["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 63)  # down columns != gate rows
    with pytest.raises(ValueError, match="not a pruning"):
        emulator_from(full.config, s, bad)
    bad = dict(sent)
    bad["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 64)  # one query head for 1 KV head of 2
    with pytest.raises(ValueError, match="not a pruning"):
        emulator_from(full.config, s, bad)
    bad = dict(sent)
    bad["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(64, 64)  # an adapter block is never pruned
    with pytest.raises(ValueError, match="expected"):
        emulator_from(full.config, s, bad)


def test_a_pruned_middle_is_distilled_anew_not_given_the_unpruned_ones_cache(tmp_path):
    """The cache key covers the middle a distillation starts from: after pruning it is another distillation."""
    from fedtune.paradigms.offsite import distill as d
    from fedtune.paradigms.offsite.prune import prune, taylor_importance

    full = _llama(8)
    s = layer_drop(8, 1, 1, 0.5)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(4, 200, (2, 16), generator=gen), torch.ones(2, 16, dtype=torch.long)) for _ in range(2)]
    settings = d.DistillSettings(steps=3, lr=1e-3)
    _, hit = d.cached_distil(build_emulator(full, s), full, full.state_dict(), s, batches, settings, tmp_path)
    assert not hit
    pruned = build_emulator(full, s)
    middle = range(s.bottom, s.bottom + len(s.kept))
    prune(pruned, middle, taylor_importance(pruned, middle, batches), 0.5, 1.0)
    losses, hit = d.cached_distil(pruned, full, full.state_dict(), s, batches, settings, tmp_path)
    assert not hit and len(losses) == 3
    assert d.cached_distil(pruned, full, full.state_dict(), s, batches, settings, tmp_path)[1] is False  # trained on
