import math

import torch

from fedtune.client.local_training import train_locally
from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.tokenize import IGNORE, Encoder, collate
from fedtune.losses import token_loss_sum


def _batches(tok, n, bs):
    train, _ = generate_tasks(train_per_task=8, eval_per_task=1)
    enc, _ = Encoder(tok, "chat", None, 96).encode_all(train[:n])
    return [collate(enc[i : i + bs], tok.pad_token_id) for i in range(0, n, bs)]


def test_loss_on_kept_positions_equals_full_logits_loss(tiny_adapter, tiny):
    batch = _batches(tiny.tokenizer, 4, 4)[0]
    model = tiny_adapter.model
    with torch.no_grad():
        loss, n = token_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(loss, full, rtol=1e-5)


def test_grad_accumulation_equals_one_big_batch(tiny_adapter, tiny):
    params = list(tiny_adapter.params.values())
    start = tiny_adapter.get_state()
    big = _batches(tiny.tokenizer, 8, 8)
    small = _batches(tiny.tokenizer, 8, 4)
    train_locally(tiny_adapter.model, params, big, 1, lambda s: 1e-2)
    after_big = tiny_adapter.get_state()
    tiny_adapter.set_state(start)
    res = train_locally(tiny_adapter.model, params, small, 2, lambda s: 1e-2)
    after_acc = tiny_adapter.get_state()
    assert res.steps == 1
    assert not torch.equal(
        after_big["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
        start["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
    )
    assert all(torch.allclose(after_big[k], after_acc[k], atol=1e-6) for k in start)


def test_non_finite_loss_marks_diverged(tiny_adapter, tiny):
    params = list(tiny_adapter.params.values())
    with torch.no_grad():
        params[0].fill_(float("nan"))
    res = train_locally(tiny_adapter.model, params, _batches(tiny.tokenizer, 8, 4), 1, lambda s: 1e-3)
    assert res.diverged and "non-finite loss" in res.error and math.isnan(res.mean_loss) and res.steps == 0
