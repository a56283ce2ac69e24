"""Joint training: several clients' LoRA rounds in one forward/backward give each the round it trains alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.routed_lora import RoutedLoRA, joint_unsupported
from fedtune.config import AdapterConfig, load_config
from fedtune.core.errors import ConfigError
from fedtune.paradigms.evaluation import EvalReply, EvalRequest
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.wire.messages import decode_message, encode_message
from tests.helpers.building import build
from tests.helpers.configs import TINY_OVERRIDES
from tests.helpers.wire import from_wire, to_wire

# clients of different sizes train different step counts (one epoch), two micro-batches a step
# (the last step of some has one), clipped, with FedProx pulling back: all per client
SETTINGS = [
    *TINY_OVERRIDES,
    "training.local_steps=null",
    "training.local_epochs=1",
    "training.batch_size=3",
    "training.grad_accum=2",
    "training.max_grad_norm=0.05",
    "training.proximal_mu=0.5",
    "partition.method=dirichlet",
    "partition.alpha=0.5",
    "runtime.joint_clients=4",
    "runtime.lanes=1",
]


def _handler(tmp_path, extra=(), dtype=torch.float64):
    """A parameter-sharing handler over the tiny model, in float64 so float order stays below 1e-9."""
    built = build(load_config(None, [*SETTINGS, *extra, f"output.dir={tmp_path}"]))
    built.bench.adapter.model.to(dtype)
    start = {k: v.to(dtype) for k, v in built.bench.initial.items()}
    return built.handler(), start, built.clients


def _request(start, round_index=1, **fields) -> bytes:
    return encode_message(TrainRequest(round=round_index, params=to_wire(start), **fields))


def _decoded(blob: bytes, start) -> TrainReply:
    reply = decode_message(blob, TrainReply)
    return replace(reply, delta=from_wire(reply.delta, start))


def _close(a: dict, b: dict, tol: float) -> None:
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=tol, atol=tol * float(b[k].abs().max())), k


def test_each_client_of_a_joint_round_gets_the_round_it_trains_alone(tmp_path):
    handler, start, data = _handler(tmp_path)
    clients = sorted(data)
    assert len({len(data[c].train) for c in clients}) > 1  # different step counts
    alone = {c: _decoded(handler.handle(c, _request(start))[0], start) for c in clients}
    together = handler.handle_many([(c, _request(start), {}) for c in clients])
    joint = {c: _decoded(blob, start) for c, (blob, _) in zip(clients, together, strict=True)}
    assert len({a.steps for a in alone.values()}) > 1
    for c in clients:
        a, j = alone[c], joint[c]
        assert a.delta and float(torch.cat([v.flatten() for v in a.delta.values()]).norm()) > 0
        _close(j.delta, a.delta, 1e-9)
        assert (j.steps, j.trained_tokens, j.num_examples) == (a.steps, a.trained_tokens, a.num_examples)
        assert j.flops == a.flops  # each client's own micro-batches, not the padded joint ones
        assert j.train_loss == pytest.approx(a.train_loss, rel=1e-10)
    assert sum(j.local_train_s for j in joint.values()) > 0


def test_scaffold_controls_and_a_mixed_exchange_are_served_as_alone(tmp_path):
    handler, start, _ = _handler(tmp_path, ["training.proximal_mu=0"])
    c = {k: torch.full_like(v, 1e-3) for k, v in start.items()}
    req = _request(start, 2, scaffold_c=c)
    alone = {k: decode_message(handler.handle(k, req)[0], TrainReply) for k in (0, 2)}
    eval_req = encode_message(EvalRequest(round=2, params=to_wire(start), split="holdout"))
    served = handler.handle_many([(0, req, {}), (1, eval_req, {}), (2, req, {})])
    assert isinstance(decode_message(served[1][0], EvalReply), EvalReply)  # served in its place
    for k, (blob, state) in zip((0, 2), (served[0], served[2]), strict=True):
        j = decode_message(blob, TrainReply)
        _close(j.scaffold_delta_c, alone[k].scaffold_delta_c, 1e-9)
        assert "scaffold" in state


def test_a_diverging_client_stops_alone_and_leaves_the_others_untouched(tmp_path):
    handler, start, _ = _handler(tmp_path)
    bad = {k: torch.full_like(v, float("nan")) if ".lora_B." in k else v for k, v in start.items()}
    alone = _decoded(handler.handle(1, _request(start))[0], start)
    out = handler.handle_many([(0, _request(bad), {}), (1, _request(start), {})])
    sick, well = (decode_message(blob, TrainReply) for blob, _ in out)
    assert sick.status == "diverged" and "non-finite loss" in sick.error and not sick.delta
    _close(from_wire(well.delta, start), alone.delta, 1e-9)


def test_the_runtime_hands_clients_over_in_groups_and_replies_in_order(tmp_path):
    from fedtune.core.types import Envelope
    from fedtune.runtime.in_process import InProcessRuntime

    seen = []

    def many(jobs):
        seen.append([cid for cid, _, _ in jobs])
        return [(f"{cid}".encode(), {"n": torch.tensor(len(jobs))}) for cid, _, _ in jobs]

    rt = InProcessRuntime(lambda *_: pytest.fail("served one at a time"), many=many, group=2)
    out = rt.send_and_receive([Envelope(c, b"") for c in (5, 3, 9)])
    assert seen == [[5, 3], [9]]
    assert [(e.client_id, e.payload) for e in out] == [(5, b"5"), (3, b"3"), (9, b"9")]
    assert int(rt.client_states()[9]["n"]) == 1
    with pytest.raises(ValueError, match="one lane"):
        InProcessRuntime(lambda *_: None, lanes=2, many=many, group=2)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["runtime.lanes=2"], "lanes=2"),
        (["runtime.name=ray"], "name=ray"),
        (["adapter.dora=true"], "adapter.dora"),
        (["adapter.dropout=0.1"], "adapter.dropout"),
        (["adapter.method=ia3"], "adapter.method ia3"),
        (["adapter.client_ranks=[2,4]"], "adapter.client_ranks"),
        (["privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.max_grad_norm=1.0"], "privacy.dp_sgd"),
        (["paradigm=kd"], "paradigm kd"),
    ],
)
def test_config_says_what_joint_training_does_not_combine_with(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [*SETTINGS, *overrides])


def test_only_row_separable_lora_routes(tiny):
    prompt = AdapterModel(tiny.model, AdapterConfig(method="prompt_tuning"), seed=0)
    assert "prompt_tuning" in joint_unsupported(prompt)
    with pytest.raises(ValueError, match="routes LoRA's rows"):
        RoutedLoRA(prompt)


@pytest.mark.parametrize("rows", [[2, 3], [2, 2, 2]], ids=["blocks of their own sizes", "equal blocks, batched"])
def test_a_routed_forward_is_each_clients_own_forward(tiny, rows):
    adapter = AdapterModel(tiny.model.double(), AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    routing = RoutedLoRA(adapter)
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in adapter.params.items()} for _ in rows]
    ids = torch.randint(0, 100, (sum(rows), 7), generator=g)  # client k's rows: the k-th block
    with torch.no_grad():
        alone = []
        for state, block in zip(states, ids.split(rows), strict=True):
            adapter.set_state(state)
            alone.append(adapter.model(input_ids=block).logits)
        with routing.route([routing.leaves(s) for s in states], rows):
            joint = adapter.model(input_ids=ids).logits
    assert torch.allclose(joint, torch.cat(alone), rtol=0, atol=1e-10)
    assert "forward" not in vars(routing.layers[0][0])  # the layers' own forward is back


def test_clients_without_data_are_refused_before_anything_trains(tmp_path):
    handler, start, _ = _handler(tmp_path)
    with pytest.raises(KeyError, match="client 99"):
        handler.handle_many([(0, _request(start), {}), (99, _request(start), {})])
