"""FedProx and SCAFFOLD on the client: the terms are really there, with the right gradients."""

from __future__ import annotations

import torch

from fedtune.client.corrections import FedProx, Scaffold, updated_client_control
from fedtune.client.data import ClientData
from fedtune.client.local_training import train_locally
from fedtune.client.trainer import round_plan
from fedtune.config import TrainingConfig
from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.tokenize import Encoder, collate
from fedtune.losses import token_loss_sum
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.wire.messages import decode_message, encode_message
from tests.helpers.building import ps_handler
from tests.helpers.wire import to_wire


def _encoded(tok):
    train, _ = generate_tasks(train_per_task=8, eval_per_task=1)
    return Encoder(tok, "chat", None, 96).encode_all(train)[0]


def test_fedprox_penalty_is_nonzero_after_one_step_and_has_the_right_gradient(tiny_adapter, tiny):
    params = list(tiny_adapter.params.values())
    anchor = [p.detach().clone() for p in params]
    mu = 0.3
    prox = FedProx(anchor, mu)
    assert prox.extra_loss(params).item() == 0.0  # w = w_global before training
    batches = [collate(_encoded(tiny.tokenizer)[:4], tiny.tokenizer.pad_token_id)]
    train_locally(tiny_adapter.model, params, batches, 1, lambda s: 1e-2, corrections=[prox])
    penalty = prox.extra_loss(params)
    assert penalty.item() > 0
    for p in params:
        p.grad = None
    penalty.backward()
    for p, a in zip(params, anchor, strict=True):
        assert torch.allclose(p.grad, mu * (p.detach() - a), atol=1e-7)


def _handler(adapter, tok, **training):
    enc = _encoded(tok)
    cfg = TrainingConfig(**{"local_steps": 3, "batch_size": 4, "lr": 1e-2, **training})
    return ps_handler(adapter, tok, {0: ClientData(enc[:16])}, cfg, total_rounds=2, seed=3), enc[:16]


def _norm(delta):
    return sum(float(v.pow(2).sum()) for v in delta.values()) ** 0.5


def test_fedprox_pulls_the_update_toward_the_global_model(tiny_adapter, tiny):
    glob = tiny_adapter.get_state()
    free, _ = _handler(tiny_adapter, tiny.tokenizer)
    prox, _ = _handler(tiny_adapter, tiny.tokenizer, proximal_mu=50.0, optimizer="sgd")
    free_sgd, _ = _handler(tiny_adapter, tiny.tokenizer, optimizer="sgd")
    req = encode_message(TrainRequest(round=1, params=to_wire(glob)))
    d_free = decode_message(free_sgd.handle(0, req)[0], TrainReply).delta
    d_prox = decode_message(prox.handle(0, req)[0], TrainReply).delta
    assert 0 < _norm(d_prox) < _norm(d_free)
    assert _norm(decode_message(free.handle(0, req)[0], TrainReply).delta) > 0


def test_scaffold_correction_moves_params_by_minus_lr_c_minus_ci():
    p = torch.nn.Parameter(torch.zeros(3))
    Scaffold([torch.full((3,), 0.5)], [torch.full((3,), 0.2)]).after_step([p], lr=0.1)
    assert torch.allclose(p.detach(), torch.full((3,), -0.03))


def test_client_control_update_formula():
    ci, c = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}
    x, y = {"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.5])}
    # c_i+ = c_i - c + (x - y) / (K lr) = 1 - 3 + 0.5 / 0.25
    assert torch.allclose(updated_client_control(ci, c, x, y, 0.25)["w"], torch.tensor([0.0]))


def test_scaffold_one_sgd_step_sets_ci_to_the_raw_gradient(tiny_adapter, tiny):
    """With SGD and one step, c_i+ = c_i - c + (g + c - c_i) = g: the gradient at the global params."""
    handler, enc = _handler(tiny_adapter, tiny.tokenizer, optimizer="sgd", local_steps=1, max_grad_norm=None)
    glob = tiny_adapter.get_state()
    control = {k: 0.01 * torch.randn_like(v) for k, v in glob.items()}
    blob, state = handler.handle(0, encode_message(TrainRequest(round=1, params=to_wire(glob), scaffold_c=control)))
    reply = decode_message(blob, TrainReply)
    # the same batch the client used, and the raw gradient there
    _, plan = round_plan(3, 1, 0, 16, handler.paradigm.trainer.cfg)
    tiny_adapter.set_state(glob)
    loss, n = token_loss_sum(tiny_adapter.model, collate([enc[i] for i in plan[0]], tiny.tokenizer.pad_token_id))
    tiny_adapter.model.zero_grad()
    (loss / n).backward()
    grads = {k: p.grad.detach().clone() for k, p in tiny_adapter.params.items()}
    for k in glob:
        assert torch.allclose(state["scaffold"][k], grads[k], atol=1e-5)
        assert torch.allclose(reply.scaffold_delta_c[k], grads[k], atol=1e-5)  # c_i was 0
