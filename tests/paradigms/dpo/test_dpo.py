"""Federated DPO: the preference losses against hand-computed values, the reference taken at the round's start,
the paradigm's refusals, and a run that scores its held-out pairs every round."""

from __future__ import annotations

import math
from functools import cache, partial

import pytest
import torch

from fedtune.config import load_config
from fedtune.core.errors import ConfigError, DataError
from fedtune.data.tokenize import collate_pairs
from fedtune.losses import sequence_log_probs
from fedtune.paradigms.dpo.objective import preference_loss_sum, preference_losses, with_reference
from tests.helpers.cli import read_metrics, run_tiny
from tests.helpers.configs import TINY_OVERRIDES

ON = ["paradigm.name=dpo", "data.dataset=builtin:preferences"]

# two pairs: rows 0, 1 chosen, rows 2, 3 their rejected replies
POLICY = torch.tensor([-1.0, -2.0, -3.0, -1.5])
REFERENCE = torch.tensor([-1.2, -2.5, -2.8, -1.0])  # log-ratios 0.2, 0.5 | -0.2, -0.5: h = 0.4, 1.0


def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_the_log_ratio_gap():
    # −log σ(0.1·0.4), −log σ(0.1·1.0), worked out by hand: log(1 + e^−0.04), log(1 + e^−0.1)
    assert preference_losses(POLICY, REFERENCE, 0.1).tolist() == pytest.approx([0.673347167, 0.644396660])


def test_label_smoothing_mixes_in_the_loss_of_the_flipped_pair():
    # 0.8·log(1 + e^−0.04) + 0.2·log(1 + e^0.04), and the same at 0.1
    got = preference_losses(POLICY, REFERENCE, 0.1, label_smoothing=0.2).tolist()
    assert got == pytest.approx([0.681347167, 0.664396660])


def test_ipo_loss_is_the_squared_gap_to_one_over_two_beta_on_per_token_ratios():
    lengths = torch.tensor([2, 5, 4, 5])  # per-token log-ratios 0.1, 0.1 | -0.05, -0.1: h = 0.15, 0.2
    got = preference_losses(POLICY, REFERENCE, 0.1, "ipo", lengths=lengths).tolist()
    assert got == pytest.approx([(0.15 - 5) ** 2, (0.2 - 5) ** 2])  # 23.5225, 23.04


def test_the_loss_falls_as_the_chosen_reply_gains_on_the_rejected():
    base = preference_losses(POLICY, REFERENCE, 0.5)
    better = preference_losses(POLICY + torch.tensor([0.3, 0.3, 0.0, 0.0]), REFERENCE, 0.5)
    worse = preference_losses(POLICY + torch.tensor([0.0, 0.0, 0.3, 0.3]), REFERENCE, 0.5)
    assert (better < base).all() and (worse > base).all()


@cache
def _built(*extra: str):
    from tests.helpers.building import build

    return build(load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *ON, *extra, "output.dir=/nonexistent/dpo"]))


def _pair_batch():
    b = _built()
    return b.bench.adapter.model, collate_pairs(b.clients[0].train[:3], b.bench.tokenizer.pad_token_id)


def test_a_reply_log_likelihood_is_the_sum_of_its_tokens_log_probabilities():
    model, batch = _pair_batch()
    with torch.no_grad():
        got = sequence_log_probs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (2B, T-1, V): position t predicts token t+1
    targets = batch["labels"][:, 1:]
    for row in range(targets.shape[0]):
        want = sum(logp[row, t, targets[row, t]].item() for t in range(targets.shape[1]) if targets[row, t] != -100)
        assert got[row].item() == pytest.approx(want, abs=1e-4)


def test_against_a_reference_taken_from_the_model_itself_every_pair_costs_log_two_and_training_lowers_it():
    model, batch = _pair_batch()
    [batch] = with_reference(model, [batch])
    assert batch["reference"].shape == (6,)
    loss, pairs = preference_loss_sum(model, batch, beta=0.5)
    assert pairs == 3 and loss.item() == pytest.approx(3 * math.log(2), abs=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    try:
        for _ in range(3):
            opt.zero_grad()
            preference_loss_sum(model, batch, beta=0.5)[0].backward()
            opt.step()
        assert preference_loss_sum(model, batch, beta=0.5)[0].item() < 3 * math.log(2)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def test_the_initial_reference_leaves_the_adapter_as_the_round_started():
    b = _built("paradigm.reference=initial")
    client = b.handler().paradigm
    start = {k: v + 0.01 for k, v in b.bench.initial.items()}
    client.adapter.load(start)
    batch = collate_pairs(b.clients[0].train[:2], b.bench.tokenizer.pad_token_id)
    [got] = client._reference(start)([batch])
    assert all(torch.equal(client.adapter.get_state()[k], v) for k, v in start.items())
    client.adapter.load(b.bench.initial)
    [want] = with_reference(client.adapter.model, [batch])
    assert torch.equal(got["reference"], want["reference"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.dataset=builtin:tasks"], "builtin:preferences"),
        (["data.train_on_prompt=true"], "train_on_prompt"),
        (["paradigm.loss=ipo", "paradigm.label_smoothing=0.1"], "label_smoothing"),
        (["privacy.dp_sgd.noise_multiplier=1.0"], "dp_sgd"),
        (["training.gradient=zeroth_order"], "gradient"),
        (["adapter.client_ranks={0: 4}"], "client_ranks"),
    ],
)
def test_settings_dpo_cannot_use_are_refused_naming_the_key(extra, message):
    with pytest.raises((ValueError, ConfigError)) as err:
        load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *ON, *extra])
    assert message in str(err.value)


def test_a_dataset_without_rejected_replies_is_refused_naming_the_client(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"instruction": "Say {i}", "output": "{i}"}}\n' for i in range(40)))
    with pytest.raises(DataError, match=r"client 0: \d+ of \d+ training examples have no rejected reply"):
        _built(f"data.dataset={data}", "partition.method=iid", "partition.field=null").handler()


def test_a_dpo_run_scores_its_held_out_pairs_every_round(tmp_path):
    per_client = ["evaluation.per_client=true", "partition.holdout_fraction=0.25"]
    code, out = run_tiny(
        tmp_path, *ON, *per_client, "federation.rounds=2", "evaluation.at_start=true", "training.lr=2e-2"
    )
    assert code == 0, out
    history = read_metrics(tmp_path / "tiny")
    start = history[0]  # the initial adapter is its own reference: every implicit reward is 0
    assert start["eval_reward_accuracy"] == 0.5 and start["eval_reward_margin"] == 0.0
    for r in history[1:]:
        assert 0 <= r["eval_reward_accuracy"] <= 1 and 0 <= r["eval_preference_accuracy"] <= 1
        assert r["eval_reward_margin"] != 0.0 and math.isfinite(r["train_loss"])
        assert r["dropped"] == {}  # honest DPO updates stay within max_update_norm=auto
        assert len(r["client_eval"]) == 4 and 0 <= r["client_eval_preference_accuracy_mean"] <= 1  # own shares
    assert history[1]["train_loss"] == pytest.approx(math.log(2), abs=0.05)  # policy = reference at step 1


def test_the_reference_pass_counts_in_the_rounds_flops():
    from fedtune.client.cost import FlopModel

    b = _built()
    client = b.handler().paradigm
    model, seen = client.adapter.model, []

    def prepare(batches):
        seen.extend(batches)
        return with_reference(model, batches)

    client.adapter.load(b.bench.initial)
    try:
        out = client.trainer.train(
            client.adapter, 0, 1, b.clients[0], loss=partial(preference_loss_sum, beta=0.1), prepare=prepare
        )
    finally:
        client.adapter.load(b.bench.initial)
    cost = FlopModel.of_model(model)
    assert seen and out.result.flops == pytest.approx(sum(cost.training(x) + cost.inference(x) for x in seen))
