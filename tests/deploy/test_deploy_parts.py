"""The deployment's parts without a network: config checks, enrolment, credentials, client state, worker socket."""

from __future__ import annotations

import os

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

pytest.importorskip("flwr")

from fedtune.config import ExperimentConfig, validate_config
from fedtune.core.errors import ConfigError
from fedtune.deploy.certs import add_client_keys, write_certs, write_client_key
from fedtune.deploy.coordinator import check_deployable, client_names
from fedtune.deploy.local_worker import StateStore


def _cfg(tmp_path, **flower) -> ExperimentConfig:
    flower = {"certs": str(tmp_path / "certs"), **flower}
    return validate_config({"partition": {"num_clients": 3}, "runtime": {"name": "flower", "flower": flower}}, "t")


def test_address_must_be_host_and_port():
    with pytest.raises(ConfigError, match="HOST:PORT"):
        validate_config({"runtime": {"flower": {"address": "coordinator"}}}, "t")
    cfg = validate_config({"runtime": {"flower": {"address": "[::1]:9000", "listen": "0.0.0.0:9100"}}}, "t")
    assert cfg.runtime.flower.host_port() == ("::1", 9000)
    assert cfg.runtime.flower.host_port(listen=True) == ("0.0.0.0", 9100)


def test_certificates_chain_to_the_ca_and_cover_the_hosts(tmp_path):
    files = write_certs(tmp_path / "certs", ["coordinator.example.org", "10.1.2.3", "127.0.0.1"], ["a", "b"])
    assert {p.name for p in files} >= {"ca.crt", "server.pem", "server.key", "a.key", "a.pub", "b.key", "b.pub"}
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    for private in ("ca.key", "server.key", "clients/a.key"):
        assert (tmp_path / "certs" / private).stat().st_mode & 0o077 == 0  # private files: owner only
    key = serialization.load_ssh_private_key((tmp_path / "certs" / "clients" / "a.key").read_bytes(), None)
    pub = serialization.load_ssh_public_key((tmp_path / "certs" / "clients" / "a.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key().public_numbers() == pub.public_numbers()
    with pytest.raises(ConfigError, match="already holds a CA"):
        write_certs(tmp_path / "certs", ["127.0.0.1"], [])


def test_client_ids_follow_enrolled_names_in_natural_order(tmp_path):
    for name in ("client-10", "client-2", "client-1"):
        write_client_key(tmp_path / "certs" / "clients", name)
    assert client_names(_cfg(tmp_path)) == ["client-1", "client-2", "client-10"]
    for name in ("x", "y"):
        write_client_key(tmp_path / "certs" / "clients", name)
    with pytest.raises(ConfigError, match="partition.num_clients=3 but 5 clients are enrolled"):
        client_names(_cfg(tmp_path))


def test_no_enrolled_keys_and_no_certificates_are_errors_that_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="fedtune certs"):
        client_names(_cfg(tmp_path))
    assert client_names(_cfg(tmp_path, insecure=True)) == ["client-0", "client-1", "client-2"]
    with pytest.raises(ConfigError, match=r"ca.crt is missing.*insecure=true"):
        check_deployable(_cfg(tmp_path))
    cfg = validate_config(
        {
            "partition": {"num_clients": 3},
            "compression": {"downlink": ["int8"], "downlink_updates": True},
            "runtime": {"name": "flower"},
        },
        "t",
    )
    with pytest.raises(ConfigError, match="downlink_updates is simulation-only"):
        check_deployable(cfg)


def test_a_deployment_refuses_to_run_without_an_update_bound(tmp_path):
    base = {"partition": {"num_clients": 3}, "runtime": {"name": "flower", "flower": {"insecure": True}}}
    with pytest.raises(ConfigError, match="max_update_norm=null"):
        check_deployable(validate_config({**base, "aggregation": {"max_update_norm": None}}, "t"))
    sgd = {"optimizer": "sgd", "max_grad_norm": None}
    with pytest.raises(ConfigError, match="cannot bound this training"):
        check_deployable(validate_config({**base, "training": sgd}, "t"))
    check_deployable(validate_config(base, "t"))  # the default: auto
    check_deployable(validate_config({**base, "aggregation": {"max_update_norm": 2.5}}, "t"))


def test_fedtune_run_points_a_deployment_config_at_server_and_client(tmp_path):
    from fedtune.experiment import run_experiment

    with pytest.raises(ConfigError, match="fedtune server CONFIG"):
        run_experiment(_cfg(tmp_path))


def test_state_store_replays_a_repeated_round_from_the_state_before_it(tmp_path):
    store = StateStore(tmp_path / "client-0")
    assert store.before(1) == {}
    for r in (1, 2, 3, 5):
        store.save(r, {"residual": {"x": torch.full((2,), float(r))}, "scaffold": {"x": torch.zeros(1)}})
    assert store.before(5)["residual"]["x"].tolist() == [3.0, 3.0]  # round 5 again: from round 3's state
    assert store.before(6)["residual"]["x"].tolist() == [5.0, 5.0] and set(store.before(6)) == {"residual", "scaffold"}
    # a request that continues round 5 (split learning's later exchanges) goes on from what round 5 saved
    assert (
        store.within(5)["residual"]["x"].tolist() == [5.0, 5.0]
        and store.within(4)["residual"]["x"].tolist() == [3.0] * 2
    )
    assert sorted(p.name for p in (tmp_path / "client-0").iterdir()) == [
        "round-000002.safetensors",
        "round-000003.safetensors",
        "round-000005.safetensors",
    ]


def test_the_durable_part_of_a_state_is_never_rolled_back(tmp_path):
    """Secure aggregation's record of the rounds a client masked in survives a repeated round: every state a
    round starts from carries the newest durable part, not the one saved with the round before."""
    from fedtune.core.types import DURABLE

    store = StateStore(tmp_path / "client-0")
    store.save(1, {"residual": {"x": torch.ones(1)}, DURABLE: {"sent": torch.tensor([1])}})
    store.save(2, {"residual": {"x": torch.ones(1) * 2}, DURABLE: {"sent": torch.tensor([1, 2])}})
    again = store.before(2)  # round 2 repeated: round 1's state, with round 2's record
    assert again["residual"]["x"].tolist() == [1.0] and again[DURABLE]["sent"].tolist() == [1, 2]
    assert set(store.before(1)) == {DURABLE} and store.before(1)[DURABLE]["sent"].tolist() == [1, 2]


def test_a_new_run_does_not_start_from_an_earlier_runs_state_and_old_runs_go(tmp_path):
    """Rounds of run B are not pruned by run A's higher round numbers, and the state of all but the most recent
    runs is deleted."""
    from fedtune.deploy.local_worker import KEEP_RUNS, LocalWorker

    worker = LocalWorker.__new__(LocalWorker)  # its store only: no model
    worker.state_dir, worker.stores = tmp_path, {}
    a = worker.store("a" * 32, 0)
    for r in (7, 8, 9):
        a.save(r, {"residual": {"x": torch.full((1,), float(r))}})
    b = worker.store("b" * 32, 0)
    b.save(1, {"residual": {"x": torch.zeros(1)}})
    assert b.before(2)["residual"]["x"].tolist() == [0.0] and b.before(1) == {}
    for i in range(KEEP_RUNS + 1):
        worker.store(f"{i:032x}", 0)
    assert len(list(tmp_path.glob("run-*"))) == KEEP_RUNS


RUN = "0123456789abcdef" * 2


def test_a_state_store_hands_back_from_memory_what_a_restarted_worker_reads_from_disk(tmp_path):
    from fedtune.core.types import DURABLE
    from fedtune.deploy.local_worker import StateStore

    def flat(state):
        return {(o, k): v.tolist() for o, part in state.items() for k, v in part.items()}

    store = StateStore(tmp_path)
    store.save(1, {"split": {"p": torch.ones(2)}, DURABLE: {"sent": torch.tensor([1])}})
    store.save(2, {"split": {"p": torch.full((2,), 2.0)}})  # no durable part: the file's is still the newest
    for r in (2, 3):
        assert flat(store.before(r)) == flat(StateStore(tmp_path).before(r))  # memory == disk, after a restart too
    assert flat(store.within(2)) == {("split", "p"): [2.0, 2.0], (DURABLE, "sent"): [1]}
    store.save(2, {"split": {"p": torch.full((2,), 3.0)}, DURABLE: {"sent": torch.tensor([1, 2])}})
    assert (
        flat(store.within(2))
        == flat(StateStore(tmp_path).within(2))
        == {
            ("split", "p"): [3.0, 3.0],
            (DURABLE, "sent"): [1, 2],
        }
    )


def test_local_worker_matches_the_simulated_client_and_replays_a_repeated_round(tmp_path):
    from fedtune.config import load_config
    from fedtune.core.rng import DOWNLINK, torch_generator
    from fedtune.deploy.local_worker import LocalWorker
    from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
    from fedtune.wire.link import Link
    from fedtune.wire.messages import decode_message, encode_message
    from tests.helpers.building import build
    from tests.helpers.configs import TINY_OVERRIDES

    cfg = load_config(
        "examples/tiny.yaml", [*TINY_OVERRIDES, "compression.uplink=[int8]", "compression.error_feedback=true"]
    )
    built = build(cfg)
    data, bench, handler = built.federated, built.bench, built.handler()
    cid = 2
    worker = LocalWorker(cfg, [data.train[i] for i in data.parts[cid]], tmp_path)

    def request(r: int) -> bytes:
        wire, _ = Link().encode(bench.initial, {}, torch_generator(DOWNLINK, cfg.seed, r))
        return encode_message(TrainRequest(r, wire))

    def essence(blob: bytes) -> tuple:
        m = decode_message(blob, TrainReply)
        return m.train_loss, m.steps, {k: v.tolist() for k, v in m.delta.items()}

    state: dict = {}
    for r in (1, 2):
        expected, state = handler.handle(cid, request(r), state)
        assert essence(worker.serve_one(cid, RUN, request(r))) == essence(expected)
    again = worker.serve_one(cid, RUN, request(2))  # the coordinator crashed and repeats round 2
    assert essence(again) == essence(expected)
    # a new run starts from nothing, whatever the earlier one left at higher rounds
    first, _ = handler.handle(cid, request(1), {})
    assert essence(worker.serve_one(cid, "f" * 32, request(1))) == essence(first)


def test_a_private_key_is_never_readable_by_others_even_while_written(tmp_path, monkeypatch):
    modes = []
    real_fdopen = os.fdopen

    def watching_fdopen(fd, *args, **kwargs):
        modes.append(os.fstat(fd).st_mode & 0o777)  # the file as it is before a byte is written
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", watching_fdopen)
    key, pub = write_client_key(tmp_path, "alice")
    assert modes and all(m == 0o600 for m in modes)
    assert key.stat().st_mode & 0o777 == 0o600 and pub.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.key", "alice.pub"]  # no temporary files left


def test_adding_a_key_never_silently_replaces_one(tmp_path):
    from typer.testing import CliRunner

    from fedtune.cli import app

    folder = tmp_path / "clients"
    old = write_client_key(folder, "carol")[0].read_bytes()
    result = CliRunner().invoke(app, ["certs", str(tmp_path), "--add", "--name", "dave", "--name", "carol"])
    assert result.exit_code != 0 and "carol.key already exist" in result.output and "--overwrite" in result.output
    assert (folder / "carol.key").read_bytes() == old and not (folder / "dave.key").exists()  # nothing written
    result = CliRunner().invoke(app, ["certs", str(tmp_path), "--add", "--name", "carol", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (folder / "carol.key").read_bytes() != old


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 200])
def test_a_client_name_must_be_a_plain_file_name(tmp_path, name):
    with pytest.raises(ConfigError, match="not a plain file name"):
        add_client_keys(tmp_path / "clients", [name])
    assert not (tmp_path / "clients").exists() and not (tmp_path / "escape.key").exists()


def test_a_deployment_always_has_a_reply_deadline(tmp_path):
    from fedtune.deploy.coordinator_app import DEFAULT_DEADLINE_S, reply_deadline

    assert reply_deadline(_cfg(tmp_path)) == DEFAULT_DEADLINE_S == 3600
    cfg = validate_config({"federation": {"round_timeout_s": 90}, "runtime": {"name": "flower"}}, "t")
    assert reply_deadline(cfg) == 90


def test_a_clients_state_directory_and_log_are_its_users_alone(tmp_path, monkeypatch):
    """Other users of the client's machine read neither its state (residuals, a secure round's keys) nor its log."""
    import logging

    from fedtune.deploy import participant

    class Stop(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(participant, "LocalWorker", no_model)
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "say hi", "output": "hi"}\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    cfg = _cfg(tmp_path, insecure=True)
    logger = logging.getLogger("fedtune")
    handlers = list(logger.handlers)
    try:
        with pytest.raises(Stop):
            participant.run_participant(cfg, None, data, None, "alice", state)
    finally:
        for h in logger.handlers[len(handlers) :]:
            h.close()
        logger.handlers[:] = handlers
    assert state.stat().st_mode & 0o077 == 0 and (state / "client.log").exists()


def test_a_key_created_between_the_check_and_the_write_is_never_overwritten(tmp_path, monkeypatch):
    """`fedtune certs --add` checks that NAME.key is new, then writes: a key that appears in between (another
    `fedtune certs`, another user's tool) is kept, and the add fails saying so."""
    from fedtune.deploy import certs

    real = certs.check_new_keys

    def check_then_race(folder, names, overwrite):
        real(folder, names, overwrite)
        (folder / "dave.key").write_bytes(b"someone else's key")

    monkeypatch.setattr(certs, "check_new_keys", check_then_race)
    with pytest.raises(ConfigError, match="appeared while it was being written"):
        certs.write_client_key(tmp_path, "dave")
    assert (tmp_path / "dave.key").read_bytes() == b"someone else's key"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
