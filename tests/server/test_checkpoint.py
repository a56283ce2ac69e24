import os

import pytest
import torch

from fedtune.aggregation import build_aggregator, fedavg
from fedtune.config import AggregationConfig
from fedtune.core.errors import RunError
from fedtune.server import checkpoint as ck
from fedtune.server.checkpoint import ServerState, load_latest, save_checkpoint


def _state(r):
    params = {"w": torch.full((3, 3), float(r)), "b": torch.arange(4, dtype=torch.bfloat16) * r}
    return ServerState(r, params, fedavg().init(params)._replace(rounds=r), [{"round": i} for i in range(r + 1)])


def _equal(a, b):
    return (
        a.round == b.round
        and a.algorithm == b.algorithm
        and a.history == b.history
        and all(torch.equal(a.params[k], b.params[k]) and a.params[k].dtype == b.params[k].dtype for k in a.params)
    )


def test_round_trip_and_latest(tmp_path):
    for r in range(3):
        save_checkpoint(tmp_path, _state(r))
    loaded = load_latest(tmp_path, fedavg().init(_state(0).params))
    assert _equal(loaded, _state(2))
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "round_0002"


def test_nothing_to_resume(tmp_path):
    assert load_latest(tmp_path, fedavg().init({})) is None


def test_keep_prunes_old_rounds(tmp_path):
    for r in range(5):
        save_checkpoint(tmp_path, _state(r), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round_*")) == ["round_0003", "round_0004"]


def test_kill_during_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _state(1))
    real = ck.save_file
    calls = []

    def dying_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # params written, aggregator half-way: the process "dies"
            raise KeyboardInterrupt("killed")
        real(tensors, path)

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _state(2))
    monkeypatch.setattr(ck, "save_file", real)
    assert _equal(load_latest(tmp_path, fedavg().init(_state(0).params)), _state(1))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog):
    save_checkpoint(tmp_path, _state(1))
    newest = save_checkpoint(tmp_path, _state(2))
    with open(newest / "params.safetensors", "r+b") as f:  # flip bytes inside the tensor data
        f.seek(os.path.getsize(newest / "params.safetensors") - 4)
        f.write(b"\xff\xff\xff\xff")
    loaded = load_latest(tmp_path, fedavg().init(_state(0).params))
    assert _equal(loaded, _state(1))
    assert "does not match its checksum" in caplog.text


def test_leftover_temp_dir_from_a_killed_write_is_ignored(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    junk = tmp_path / "checkpoints" / ".tmp-round_0002-abc"
    junk.mkdir()
    (junk / "params.safetensors").write_bytes(b"partial")
    assert load_latest(tmp_path, fedavg().init(_state(0).params)).round == 1
    assert not junk.exists()


def test_replicas_are_stored_once_and_come_back_shared(tmp_path):
    from dataclasses import replace

    from safetensors.torch import load_file

    shared, own = {"w": torch.ones(3)}, {"w": torch.zeros(3)}
    state = replace(_state(1), replicas={0: shared, 1: shared, 2: own, 5: shared})
    path = save_checkpoint(tmp_path, state)
    assert len(load_file(path / "replicas.safetensors")) == 2  # two distinct replicas, not four
    loaded = load_latest(tmp_path, fedavg().init(state.params))
    assert sorted(loaded.replicas) == [0, 1, 2, 5]
    assert (
        loaded.replicas[0] is loaded.replicas[1] is loaded.replicas[5] and loaded.replicas[2] is not loaded.replicas[0]
    )
    assert torch.equal(loaded.replicas[5]["w"], shared["w"]) and torch.equal(loaded.replicas[2]["w"], own["w"])


def test_client_state_keeps_one_namespace_per_owner(tmp_path):
    state = _state(1)
    state.clients = {
        0: {"scaffold": {"w": torch.ones(2)}, "residual": {"3.17": torch.zeros(3)}},
        5: {"held": {"w": torch.full((2,), 2.0)}, "kd": {"w": torch.full((2,), 3.0)}},
    }
    save_checkpoint(tmp_path, state)
    back = load_latest(tmp_path, state.algorithm).clients
    assert {c: {o: set(p) for o, p in s.items()} for c, s in back.items()} == {
        0: {"scaffold": {"w"}, "residual": {"3.17"}},
        5: {"held": {"w"}, "kd": {"w"}},
    }
    assert torch.equal(back[5]["kd"]["w"], torch.full((2,), 3.0))


def test_old_flat_client_state_loads_under_its_owners():
    from fedtune.core.types import flatten_state, unflatten_state

    old = {"control/w": torch.ones(1), "residual/3.1": torch.zeros(1), "held/w": torch.ones(1)}
    assert {o: set(p) for o, p in unflatten_state(old).items()} == {
        "scaffold": {"w"},
        "residual": {"3.1"},
        "held": {"w"},
    }
    with pytest.raises(ValueError, match="without '/'"):
        flatten_state({"a/b": {"w": torch.ones(1)}})


def test_rounds_sort_by_number_not_name_so_pruning_keeps_the_newest(tmp_path):
    for r in (9998, 9999, 10000, 10001):
        save_checkpoint(tmp_path, _state(r), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round_*")) == ["round_10000", "round_10001"]
    assert load_latest(tmp_path, fedavg().init(_state(0).params)).round == 10001


def test_round_directories_none_of_which_loads_stop_the_resume_and_touch_nothing(tmp_path):
    for r in (1, 2):
        newest = save_checkpoint(tmp_path, _state(r))
        (newest / "state.json").write_text("{")  # truncated
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(RunError, match="none of its 2 checkpoints loads") as err:
        load_latest(tmp_path, fedavg().init(_state(0).params))
    assert "round_0002" in str(err.value) and "output.name" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_a_checkpoint_of_another_algorithm_is_refused_not_restarted(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    with pytest.raises(RunError, match="resume with the same paradigm and aggregation settings"):
        load_latest(tmp_path, build_aggregator(AggregationConfig(name="fedadam")).init(_state(0).params))
