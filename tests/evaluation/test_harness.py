import pytest
import torch

from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.tokenize import Encoder, collate
from fedtune.evaluation import harness
from fedtune.evaluation.harness import EvalSet, evaluate
from fedtune.evaluation.scoring import Scores
from fedtune.losses import token_loss_sum


def test_evaluate_reports_loss_accuracy_and_groups(tiny, monkeypatch):
    _, ev = generate_tasks(train_per_task=1, eval_per_task=2)
    data = EvalSet.build(ev, Encoder(tiny.tokenizer, "chat", None, 96))
    # an oracle generator answers the first example of each task right: accuracy is exactly 0.5 per task
    answers = [ex.target if i % 2 == 0 else "wrong" for i, ex in enumerate(ev)]
    real = harness.score

    def oracle(*args, **kwargs):
        s = real(*args, **kwargs)
        return Scores(s.log_likelihood, s.tokens, s.choices, answers)

    monkeypatch.setattr(harness, "score", oracle)
    out = evaluate(tiny.model, tiny.tokenizer, data, 4, True, 4, "task")
    assert out["eval_accuracy"] == 0.5 and set(out["eval_accuracy_by_task"].values()) == {0.5}
    assert out["eval_loss"] > 0 and abs(out["eval_ppl"] - torch.tensor(out["eval_loss"]).exp().item()) < 1e-3


def test_real_generation_returns_one_string_per_prompt(tiny):
    _, ev = generate_tasks(train_per_task=1, eval_per_task=1)
    data = EvalSet.build(ev, Encoder(tiny.tokenizer, "chat", None, 96))
    preds = harness.generate(tiny.model, tiny.tokenizer, data, max_new_tokens=3, batch_size=3)
    assert len(preds) == len(ev) and all(isinstance(p, str) for p in preds)
    joint = evaluate(tiny.model, tiny.tokenizer, data, 3, True, 3, None)  # generation shares the scoring pass
    assert joint["eval_accuracy"] == sum(p.strip() == ex.target for p, ex in zip(preds, ev, strict=True)) / len(ev)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_eval_loss_is_the_training_loss_on_the_same_sequences(tiny, train_on_prompt):
    _, ev = generate_tasks(train_per_task=1, eval_per_task=3)
    data = EvalSet.build(ev, Encoder(tiny.tokenizer, "chat", "Be brief.", 96, train_on_prompt))
    pad = tiny.tokenizer.pad_token_id
    total, n = token_loss_sum(tiny.model, collate(data.encoded, pad))
    for batch_size in (1, 5, 12):
        assert evaluate(tiny.model, tiny.tokenizer, data, batch_size, False, 1, None)["eval_loss"] == pytest.approx(
            total.item() / n, abs=1e-4
        )
