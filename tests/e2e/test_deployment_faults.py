"""Faults in a real deployment on 127.0.0.1: killed clients, unknown clients, a killed coordinator.

Each test runs real `fedtune server` / `fedtune client` processes and bounds every wait.
"""

from __future__ import annotations

import json
import re

import pytest

from fedtune.deploy.certs import write_client_key
from tests.helpers.deployment import Federation

pytest.importorskip("flwr")


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~200 s, mostly waiting: Flower's heartbeat expiry (~45 s), rounds that run out their deadline
def test_a_killed_client_is_dropped_for_its_round_rejoins_later_and_an_unknown_key_is_refused(tmp_path):
    fed = Federation(
        tmp_path,
        {
            # a deadline well above a round's few seconds, even with three clients training on 2 busy cores
            "federation": {"rounds": 10, "min_clients": 2, "round_timeout_s": 30},
            "training": {"local_steps": 40, "batch_size": 8},  # a second or more of training to kill a client in
        },
    )
    rogue = write_client_key(tmp_path / "rogue", "client-9")[0]
    try:
        fed.server()
        for cid in range(3):
            fed.client(cid)
        fed.client(0, rogue, "rogue", "--refused-retry-s", "0")
        assert fed.wait_exit("rogue", 120) == 2
        assert "not enrolled" in fed.output("rogue")
        fed.wait_for("server", r"refused a client: its key is not enrolled")

        fed.wait_for("client-2", r"round 2: train request", 180)
        fed.kill("client-2")  # mid-round: it is training, its reply never comes
        # restarted at once, it is refused until the coordinator notices (missed heartbeats, ~45 s) that
        # its old self is gone; meanwhile its requests expire with each round's deadline
        fed.client(2, tag="client-2-again")
        fed.wait_for("client-2-again", r"connected to the coordinator", 120)
        assert fed.wait_exit("server", 300) == 0, fed.output("server")
    finally:
        fed.close()
    history = _history(fed.run_dir)
    assert [h["round"] for h in history] == list(range(11))  # every round exactly once
    assert history[1]["clients"] == [0, 1, 2]
    assert history[2]["clients"] == [0, 1] and "2" in history[2]["dropped"]
    assert history[10]["clients"] == [0, 1, 2]  # back for the later rounds
    back = [int(r) for r in re.findall(r"round (\d+): train request", fed.output("client-2-again"))]
    assert back and all(2 in history[r]["clients"] for r in back)  # no stale round served after the return
    assert "client 2 (client-2)" in fed.output("server")  # the coordinator said who dropped and why


@pytest.mark.slow  # ~80 s: a deployment run twice, one killed mid-round
def test_a_coordinator_killed_mid_round_resumes_and_matches_an_uninterrupted_run(tmp_path):
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    # error feedback: every client's residual must be replayed exactly when round 2 is redone
    settings = {
        "federation": {"rounds": 3, "min_clients": 3},
        "compression": {"uplink": ["int8"], "error_feedback": True},
        "training": {"local_steps": 40, "batch_size": 8},  # a round long enough to kill the coordinator in
    }
    fed = Federation(tmp_path, settings)
    try:
        fed.server()
        for cid in range(3):
            fed.client(cid)
        fed.wait_for("client-0", r"round 2: train request", 180)
        fed.kill("server")  # mid-round 2: round 1 is checkpointed, round 2 is not
        assert not (fed.run_dir / "checkpoints" / "round_0002").exists()
        fed.server("--resume")  # the clients join the restarted coordinator by themselves
        assert fed.wait_exit("server", 300) == 0, fed.output("server")
    finally:
        fed.close()
    history = _history(fed.run_dir)
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert all(h["clients"] == [0, 1, 2] for h in history[1:])
    cfg = load_config(fed.config, ["runtime.name=in_process", "output.name=reference"])
    reference = run_experiment(cfg).run_dir
    assert (fed.run_dir / "final_adapter" / "adapter_model.safetensors").read_bytes() == (
        reference / "final_adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert [h.get("train_loss") for h in history] == [h.get("train_loss") for h in _history(reference)]


@pytest.mark.slow  # ~50 s: waits out a deployed round's deadline
def test_too_few_replies_stop_the_run_cleanly_with_the_last_checkpoint_intact(tmp_path):
    fed = Federation(
        tmp_path,
        {
            "partition": {"num_clients": 2},
            "federation": {"rounds": 3, "min_clients": 2, "round_timeout_s": 30},
            "training": {"local_steps": 40, "batch_size": 8},  # a second or more of training to kill a client in
        },
    )
    try:
        fed.server()
        fed.client(0)
        fed.client(1)
        fed.wait_for("server", r"round 1/3", 180)
        fed.wait_for("client-1", r"round 2: train request", 60)
        fed.kill("client-1")  # mid-round 2: it is training, its reply never comes
        code = fed.wait_exit("server", 180)
    finally:
        fed.close()
    out = fed.output("server")
    assert code == 2, out
    assert "only 1 of 2 clients returned a usable reply" in out and "min_clients=2" in out
    assert "--resume" in out
    # the kill lands mid-round 2, or (a fast machine finishing its steps before the signal) mid-round 3:
    # either way the run stops at the failed round with every round before it recorded and checkpointed
    failed = int(re.search(r"round (\d+): only 1 of 2 clients", out).group(1))
    assert failed in (2, 3), out
    assert [h["round"] for h in _history(fed.run_dir)] == list(range(failed))
    last = f"round_{failed - 1:04d}"
    ckpts = sorted(p.name for p in (fed.run_dir / "checkpoints").iterdir())
    assert (
        ckpts[-1] == last
        and json.loads((fed.run_dir / "checkpoints" / last / "state.json").read_text())["round"] == failed - 1
    )


@pytest.mark.slow  # ~50 s: a whole plain-text deployment
def test_insecure_mode_is_explicit_and_loud(tmp_path):
    fed = Federation(tmp_path, {"runtime": {"flower": {"insecure": True}}, "federation": {"rounds": 1}})
    try:
        fed.server()
        for cid in range(3):
            fed._start(
                f"client-{cid}",
                "client",
                str(fed.config),
                "--data",
                str(tmp_path / "data" / f"client-{cid}.jsonl"),
                "--name",
                f"client-{cid}",
            )
        assert fed.wait_exit("server", 180) == 0, fed.output("server")
    finally:
        fed.close()
    assert "plain text" in fed.output("server") and "WARNING" in fed.output("server")
    assert _history(fed.run_dir)[1]["clients"] == [0, 1, 2]


def test_the_coordinator_refuses_to_start_without_certificates(tmp_path):
    fed = Federation(tmp_path)
    (tmp_path / "certs" / "server.key").unlink()
    proc = fed.server(ready=False)
    assert proc.wait(60) == 2
    out = fed.output("server")
    assert "server.key is missing" in out and "fedtune certs" in out and "insecure" in out
