import torch

from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.tokenize import Encoder
from fedtune.evaluation import harness
from fedtune.evaluation.harness import EvalSet, evaluate


def test_evaluate_reports_loss_accuracy_and_groups(tiny, monkeypatch):
    _, ev = generate_tasks(train_per_task=1, eval_per_task=2)
    data = EvalSet.build(ev, Encoder(tiny.tokenizer, "chat", None, 96))
    # an oracle generator answers the first example of each task right: accuracy is exactly 0.5 per task
    answers = [ex.target if i % 2 == 0 else "wrong" for i, ex in enumerate(ev)]
    monkeypatch.setattr(harness, "greedy_generate", lambda *a, **k: answers)
    out = evaluate(tiny.model, tiny.tokenizer, data, 4, True, 4, "task")
    assert out["eval_accuracy"] == 0.5 and set(out["eval_accuracy_by_task"].values()) == {0.5}
    assert out["eval_loss"] > 0 and abs(out["eval_ppl"] - torch.tensor(out["eval_loss"]).exp().item()) < 1e-3


def test_real_generation_returns_one_string_per_prompt(tiny):
    _, ev = generate_tasks(train_per_task=1, eval_per_task=1)
    data = EvalSet.build(ev, Encoder(tiny.tokenizer, "chat", None, 96))
    preds = harness.greedy_generate(tiny.model, tiny.tokenizer, data.prompts, max_new_tokens=3, batch_size=3)
    assert len(preds) == len(ev) and all(isinstance(p, str) for p in preds)


def test_eval_loss_is_batch_size_invariant(tiny):
    _, ev = generate_tasks(train_per_task=1, eval_per_task=3)
    data = EvalSet.build(ev, Encoder(tiny.tokenizer, "chat", None, 96))
    pad = tiny.tokenizer.pad_token_id
    a, b = harness.eval_loss(tiny.model, data.encoded, pad, 1), harness.eval_loss(tiny.model, data.encoded, pad, 12)
    assert abs(a - b) < 1e-4
