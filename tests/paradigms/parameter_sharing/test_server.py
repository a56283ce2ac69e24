"""Parameter sharing, server side, against a real training client: what SCAFFOLD's control deltas may be."""

from dataclasses import replace

import pytest
import torch

from fedtune.aggregation import build_aggregator
from fedtune.aggregation.clipping import update_norm
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.client.schedule import RoundSchedule
from fedtune.config import AggregationConfig, TrainingConfig
from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.tokenize import Encoder
from fedtune.paradigms.base import BadReply, Replies, converse
from fedtune.paradigms.parameter_sharing.server import ParameterSharing, SharingSettings
from fedtune.wire.messages import decode_message, encode_message
from tests.helpers.building import ps_handler
from tests.helpers.wire import from_wire

TRAININGS = {
    "steps, cosine with warmup": dict(local_steps=3, lr_schedule="cosine", warmup_ratio=0.3),
    "epochs, linear, per round": dict(local_steps=None, local_epochs=1.5, lr_schedule="linear", schedule_scope="round"),
}


def _federation(adapter, tok, max_norm, **training):
    train, _ = generate_tasks(train_per_task=8, eval_per_task=1)
    enc, _ = Encoder(tok, "chat", None, 96).encode_all(train)
    data = {0: ClientData(enc[:16]), 1: ClientData(enc[16:27])}
    t = TrainingConfig(batch_size=4, lr=5e-2, optimizer="sgd", **training)
    handler = ps_handler(adapter, tok, data, t, total_rounds=4, seed=3)
    schedule = RoundSchedule(
        t.lr,
        t.lr_schedule,
        t.warmup_ratio,
        t.schedule_scope,
        4,
        t.batch_size,
        t.grad_accum,
        t.local_steps,
        t.local_epochs,
    )
    settings = SharingSettings(2, 3, max_update_norm=max_norm, weight_cap=WeightCap(20, 96), schedule=schedule)
    agg = build_aggregator(AggregationConfig(scaffold=True), num_clients=2)
    return handler, ParameterSharing(agg, settings, adapter.get_state())


def _round(paradigm, state, r, handler, tamper=lambda c, reply: reply):
    """One round with the real client; ``tamper(client, reply)`` may change a decoded reply before the
    server reads it. -> (new state, {client: the reply as read}, {client: why it was dropped})."""
    replies, dropped = {}, {}

    def exchange(ex):
        accepted = {}
        for c, msg in ex.messages.items():
            blob, _ = handler.handle(c, encode_message(msg))
            replies[c] = tamper(c, decode_message(blob, ex.reply))
            try:
                accepted[c] = ex.read(c, replies[c])
            except BadReply as exc:
                dropped[c] = str(exc)
        return Replies(accepted, dropped)

    new, _ = converse(paradigm.round(r, state, [0, 1]), exchange)
    return new, replies, dropped


@pytest.mark.parametrize("training", TRAININGS.values(), ids=TRAININGS.keys())
def test_an_honest_control_delta_is_the_update_over_the_lr_path(tiny_adapter, tiny, training):
    """Δc_i + c = (x − y_i) / Σlr: the server's Σlr (from the config and the step count) is the client's."""
    handler, ps = _federation(tiny_adapter, tiny.tokenizer, max_norm=100.0, **training)
    sched, state = ps.settings.schedule, ps.initial_state()
    for r in (1, 2, 3):  # c != 0 from round 2 on
        c = state.algorithm.control
        state, replies, dropped = _round(ps, state, r, handler)
        assert dropped == {}
        for reply in replies.values():
            assert reply.steps == sched.steps(reply.num_examples)
            moved = update_norm({k: reply.scaffold_delta_c[k] + c[k] for k in c}) * sched.lr_sum(r, reply.steps)
            assert moved == pytest.approx(update_norm(from_wire(reply.delta, c)), rel=1e-4)


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (lambda rep: replace(rep, scaffold_delta_c={k: v * 1e3 for k, v in rep.scaffold_delta_c.items()}), "norm"),
        (lambda rep: replace(rep, steps=rep.steps + 1), "local steps do not follow"),
        (lambda rep: replace(rep, num_examples=10**9), "more than federation.max_client_examples"),
    ],
)
def test_a_control_delta_beyond_the_update_bound_never_reaches_c(tiny_adapter, tiny, tamper, why):
    handler, ps = _federation(tiny_adapter, tiny.tokenizer, max_norm=1.0, **TRAININGS["steps, cosine with warmup"])
    state, _, _ = _round(ps, ps.initial_state(), 1, handler)
    new, replies, dropped = _round(ps, state, 2, handler, lambda c, rep: tamper(rep) if c == 1 else rep)
    assert list(dropped) == [1] and why in dropped[1]
    honest = {k: v + replies[0].scaffold_delta_c[k] / 2 for k, v in state.algorithm.control.items()}
    assert all(torch.equal(new.algorithm.control[k], honest[k]) for k in honest)  # c moved by client 0 alone
