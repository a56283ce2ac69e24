"""model.device: auto takes a GPU only where there is one and the run can use it; tensors leave the model on the CPU.

The GPU tests skip without CUDA (CI has none); on a machine with one they check that a client's round
on the GPU trains what it trains on the CPU, that joint training there matches clients in turn, and
that a whole run from the CLI works.
"""

from __future__ import annotations

import pytest
import torch

from fedtune.assembly import placement_of
from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.models.device import batch_to, model_device
from fedtune.models.placement import available_cores, device_of
from tests.helpers.configs import TINY_OVERRIDES

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(*overrides: str):
    return load_config(None, [*TINY_OVERRIDES, *overrides])


def _device(cfg) -> torch.device:
    return placement_of(cfg).device


def _joint(cfg) -> int:
    return placement_of(cfg).joint


def _lanes(cfg) -> int:
    return placement_of(cfg).lanes


def test_auto_is_the_cpu_without_a_gpu_or_where_the_run_cannot_use_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(_cfg()).type == "cpu"
    assert _joint(_cfg()) == 1 and _lanes(_cfg()) == min(available_cores(), 4)  # lanes on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device(_cfg()) == torch.device("cuda")
    assert _device(_cfg("paradigm=kd")).type == "cpu"  # KD's exchanges stay on the CPU so far
    dp = ("privacy.dp_sgd.noise_multiplier=1.0",)
    assert _device(_cfg(*dp)).type == "cpu"
    assert _device(_cfg("runtime.name=ray")).type == "cpu"  # its workers share weights in host memory
    assert _device(_cfg("model.device=cpu")).type == "cpu"


def test_on_a_gpu_auto_runs_one_lane_and_trains_clients_jointly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _lanes(_cfg()) == 1
    assert _joint(_cfg()) == 4  # the four clients of a round, at most 8
    assert _joint(_cfg("partition.num_clients=12")) == 8
    assert _joint(_cfg("adapter.method=ia3")) == 1  # no rows to route
    assert _joint(_cfg("runtime.joint_clients=2")) == 2
    with pytest.raises(ConfigError, match="CUDA does not survive a fork"):
        _lanes(_cfg("runtime.lanes=2"))


def test_an_explicit_gpu_is_checked_against_the_machine_and_the_config(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        _device(_cfg("model.device=cuda"))
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        device_of("cuda:0")
    with pytest.raises(ConfigError, match=r"paradigm kd does not support a GPU \(model\.device=cuda\)"):
        _cfg("model.device=cuda", "paradigm=kd")
    with pytest.raises(ConfigError, match=r"model\.device=cuda does not combine with privacy\.dp_sgd"):
        _cfg("model.device=cuda", "privacy.dp_sgd={}")
    with pytest.raises(ConfigError, match=r"runtime\.lanes=2"):
        _cfg("model.device=cuda:0", "runtime.lanes=2")
    with pytest.raises(ConfigError, match="model.device"):
        _cfg("model.device=gpu")


def test_batches_move_to_the_model_and_adapter_state_leaves_it_on_the_cpu(tiny_adapter):
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert batch_to(batch, torch.device("cpu")) is batch
    assert model_device(tiny_adapter.model) == torch.device("cpu")
    assert model_device(torch.nn.Module()) == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in tiny_adapter.get_state().values())


def _round_replies(tmp_path, device: str, joint: bool) -> list:
    from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
    from fedtune.wire.messages import decode_message, encode_message
    from tests.helpers.building import build
    from tests.helpers.wire import from_wire, to_wire

    overrides = [f"model.device={device}", "training.proximal_mu=0.1", f"output.dir={tmp_path}"]
    built = build(_cfg(*overrides, f"runtime.joint_clients={4 if joint else 1}", "runtime.lanes=1"))
    bench, data = built.bench, built.clients
    assert model_device(bench.adapter.model).type == device
    handler = built.handler()
    request = encode_message(TrainRequest(round=1, params=to_wire(bench.initial)))
    jobs = [(c, request, {}) for c in sorted(data)]
    served = handler.handle_many(jobs) if joint else [handler.handle(*j) for j in jobs]
    return [from_wire(decode_message(blob, TrainReply).delta, bench.initial) for blob, _ in served]


def _rel_gap(a: list, b: list) -> float:
    flat = [torch.cat([d[k].flatten() for d in x for k in sorted(d)]) for x in (a, b)]
    return float((flat[0] - flat[1]).norm() / flat[1].norm())


@needs_gpu
def test_a_round_on_the_gpu_trains_what_it_trains_on_the_cpu(tmp_path):
    cpu = _round_replies(tmp_path / "cpu", "cpu", joint=False)
    gpu = _round_replies(tmp_path / "gpu", "cuda", joint=False)
    assert all(t.device.type == "cpu" for d in gpu for t in d.values())
    assert _rel_gap(gpu, cpu) < 1e-3  # float32 kernels of another order (no TF32)


@needs_gpu
def test_joint_training_on_the_gpu_matches_clients_in_turn(tmp_path):
    alone = _round_replies(tmp_path / "alone", "cuda", joint=False)
    joint = _round_replies(tmp_path / "joint", "cuda", joint=True)
    assert _rel_gap(joint, alone) < 1e-4


@needs_gpu
def test_a_run_from_the_cli_trains_on_the_gpu_by_default(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedtune.cli import app

    result = CliRunner().invoke(app, ["run", "examples/tiny.yaml", *TINY_OVERRIDES, f"output.dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in next(tmp_path.glob("*/metrics.jsonl")).read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["train_loss"] > 0 for r in rows[1:])
    assert " on cuda" in next(tmp_path.glob("*/run.log")).read_text()
