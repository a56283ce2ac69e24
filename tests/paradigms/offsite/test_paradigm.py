"""Offsite-tuning as a paradigm: its round with real clients, hostile replies in each exchange, what it exports,
what a client process holds, and the config's rules."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
import torch

from fedtune.core.errors import ConfigError
from fedtune.paradigms.base import converse
from fedtune.paradigms.offsite.messages import EmulatorReply, EmulatorRequest
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.server.round_loop import Network
from fedtune.wire.messages import decode_message, encode_message
from tests.helpers.building import build
from tests.helpers.configs import tiny_config
from tests.helpers.served import Served

OFFSITE = ["model.name=tiny-llama-deep", "paradigm.name=offsite", "paradigm.bottom=1", "paradigm.top=1"]
RUN_DIR = Path("/nonexistent/offsite")  # only named in a quorum error


@cache
def _built():
    return build(tiny_config(*OFFSITE, "partition.num_clients=3", "evaluation.exact_match=false"))


def _round(at: int = -1, hostile=None):
    """Round 1 with clients 0..2 on fresh client processes: (dropped reasons, new params, bytes down)."""
    b = _built()
    server = b.server(lambda params, r, on=None: {})
    runtime = Served(b.handler(), at, hostile)
    net = Network(runtime, 1, [0, 1, 2], 1, RUN_DIR)
    state, _ = converse(server.round(1, server.initial_state(), [0, 1, 2]), net.exchange)
    return net.dropped, state.params, net.bytes["train"][0]


def _package(server):
    """The server's emulator as it is sent: weights, digest, initial adapter."""
    from types import SimpleNamespace

    host = server.host
    return SimpleNamespace(weights=host.weights(), digest=host.digest(), initial=host.initial)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_round_sends_the_emulator_to_each_client_that_lacks_it_and_trains_on_its_adapter_blocks():
    dropped, params, down = _round()
    assert not dropped
    b = _built()
    server = b.server(lambda params, r, on=None: {})
    weights = server.host.weights()
    assert down > 3 * sum(t.numel() * t.element_size() for t in weights.values())  # sent whole to each of 3
    assert not _same(params, server.inner.initial)  # the clients' updates moved the global adapter
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in params}
    assert blocks == {0, 2}  # the emulator's first and last of its 3 blocks
    full = server.final_adapters(server.initial_state())[""]
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in full} == {0, 3}  # the full model's 4 blocks
    assert _same(full, b.bench.initial)  # the round-0 adapter plugged in is the full model's own initial one


@pytest.mark.parametrize(("method", "marker"), [("blocks", ".weight"), ("ia3", ".ia3_l"), ("bottleneck", ".adapter_")])
def test_any_method_confined_to_the_adapter_blocks_federates_over_the_emulator(method, marker):
    """Full tuning of the adapter blocks (their own weights travel as the adapter, not in the emulator, so its
    digest holds between rounds and it is sent once), IA3 and bottleneck adapters on them: two rounds with
    real clients; the server's full model and frozen emulator are untouched by the clients' training."""
    b = build(tiny_config(*OFFSITE, f"adapter.method={method}", "partition.num_clients=2"))
    server = b.server(lambda params, r, on=None: {})
    frozen = {n: t.clone() for n, t in server.host.weights().items()}
    full = {n: t.detach().clone() for n, t in b.bench.adapter.base_params.items()}
    digest = server.host.digest()
    assert not set(frozen) & set(server.host.initial)  # an adapter tensor is never also in the emulator sent
    runtime = Served(b.handler())
    state, downs = server.initial_state(), []
    for r in (1, 2):
        net = Network(runtime, r, [0, 1], 1, RUN_DIR)
        state, _ = converse(server.round(r, state, [0, 1]), net.exchange)
        assert not net.dropped, net.dropped
        downs.append(net.bytes["train"][0])
    sent = sum(t.numel() * t.element_size() for t in frozen.values())
    assert server.host.digest() == digest and downs[0] - downs[1] >= 2 * sent  # the emulator went down once
    assert all(marker in k for k in state.params) and not _same(state.params, server.inner.initial)
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in state.params} == {0, 2}
    assert _same(frozen, {n: t for n, t in server.host.weights().items()})  # the clients trained copies
    plugged = server.final_adapters(state)[""]
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in plugged} == {0, 3}
    if method == "blocks":  # the adapter is the full model's own block weights: its middle stays put
        after = b.bench.adapter.base_params
        assert all(torch.equal(after[n], full[n]) for n in full if ".layers.1." in n or ".layers.2." in n)


def _honest_without_1():
    return _round(0, lambda payload: None)


def _reply(payload: bytes, **fields) -> bytes:
    req = decode_message(payload, EmulatorRequest)
    return encode_message(EmulatorReply(**{"round": req.round, "digest": req.digest, "status": "missing", **fields}))


def _header(blob: bytes, **fields) -> bytes:
    from fedtune.wire.serialize import decode, encode

    tensors, header = decode(blob)
    return encode(tensors, {**header, **fields})


@pytest.mark.parametrize(
    ("at", "hostile", "reason"),
    [
        (0, lambda p: _reply(p, round=0), "stale reply"),
        (0, lambda p: _reply(p, digest="0" * 64), "another emulator"),
        (0, lambda p: _header(_reply(p), status="bogus"), "unreadable"),
        (0, lambda p: b"\x00" * 40, "unreadable"),
        (0, lambda p: encode_message(TrainReply(1, {}, 1, 1, 1, 0.5, 0.1)), "unreadable"),
        (1, lambda p: _reply(p), "still does not hold"),  # sent the emulator, says it still lacks it
        (1, lambda p: _reply(p, status="held", digest="f" * 64), "another emulator"),
        (2, lambda p: encode_message(EmulatorReply(1, "", "missing")), "no longer holds"),  # a train request
        (2, lambda p: encode_message(EmulatorReply(1, "", "held")), "no longer holds"),
    ],
)
def test_a_hostile_reply_in_any_exchange_drops_only_its_client(at, hostile, reason):
    dropped, params, _ = _round(at, hostile)
    assert list(dropped) == [1] and reason in dropped[1], dropped
    _, honest, _ = _honest_without_1()
    assert _same(params, honest)  # what clients 0 and 2 alone give


def test_what_a_missing_client_says_it_holds_is_only_a_key_it_cannot_widen():
    """``holds`` of a type other than text drops its client; any text (here 4,000 characters, or a digest this
    server never sent) only selects what is sent: the whole emulator, which the honest client then takes."""
    dropped, _, _ = _round(0, lambda p: _header(_reply(p), holds=7))
    assert list(dropped) == [1] and "unreadable" in dropped[1]
    _, reference, down = _round()
    for holds in ("x" * 4000, "0" * 64):  # client 1's question answered thus; the real client 1 is sent the rest
        dropped, params, sent = _round(0, lambda p, h=holds: _reply(p, holds=h))
        assert not dropped and _same(params, reference) and sent == down


def test_the_train_request_reaches_parameter_sharing_clients_over_the_emulator():
    """A client process that has the emulator serves parameter sharing's request on it; one without it says so."""
    b = _built()
    server = b.server(lambda params, r, on=None: {})
    handler = b.handler()
    e = _package(server)
    req = encode_message(TrainRequest(1, params=server.inner.downlink.encode(e.initial, {}, None)[0]))
    lost = decode_message(handler.handle(0, req)[0], EmulatorReply, TrainReply)
    assert isinstance(lost, EmulatorReply) and lost.status == "missing"
    asked = decode_message(handler.handle(0, encode_message(EmulatorRequest(1, e.digest)))[0], EmulatorReply)
    assert asked.status == "missing"
    whole = encode_message(EmulatorRequest(1, e.digest, e.weights, e.initial))
    assert decode_message(handler.handle(0, whole)[0], EmulatorReply).status == "held"
    reply = decode_message(handler.handle(0, req)[0], TrainReply)
    assert reply.status == "ok" and reply.steps > 0 and reply.delta
    tampered = {**e.weights, next(iter(e.weights)): torch.zeros_like(next(iter(e.weights.values())))}
    with pytest.raises(ValueError, match="digest"):
        b.handler().handle(0, encode_message(EmulatorRequest(1, e.digest, tampered, e.initial)))
    # a middle-only update onto the emulator held whose result is not the emulator it names: refused, and
    # the process then holds nothing (asked again, it says so)
    middle = {n: torch.zeros_like(e.weights[n]) for n in server.host.middle_names()}
    with pytest.raises(ValueError, match="digest"):
        handler.handle(0, encode_message(EmulatorRequest(2, "ab" * 32, middle, base=e.digest)))
    asked = decode_message(handler.handle(0, encode_message(EmulatorRequest(2, e.digest)))[0], EmulatorReply)
    assert asked.status == "missing" and asked.holds == ""
    assert isinstance(decode_message(handler.handle(0, req)[0], EmulatorReply, TrainReply), EmulatorReply)


CLIENT_PROCESS = textwrap.dedent(
    """
    import gc, json, sys, torch
    import fedtune.models.loading as loading
    def refuse(*a, **k):
        raise AssertionError("a client loaded a model")
    loading.load_model = refuse
    import fedtune.adapters.build as build_mod
    build_mod.load_model = refuse
    from fedtune.assembly import client_workbench, make_handler, plan_of, local_client_data
    from fedtune.config import load_config
    from fedtune.data.prepare import prepare_federated_data
    cfg = load_config(sys.argv[1])
    plan = plan_of(cfg)
    bench = client_workbench(cfg, plan)
    assert bench.adapter is None
    fed = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
    data = {0: local_client_data([fed.train[i] for i in fed.parts[0]], bench.encoder, cfg, 0)}
    handler = make_handler(plan, bench, data)
    replies = [handler.handle(0, open(p, "rb").read())[0] for p in sys.argv[3:]]
    probes = torch.load(sys.argv[2])
    mine = {p.untyped_storage().data_ptr() for p in probes.values()}
    live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta
            and o.untyped_storage().data_ptr() not in mine]
    found = {name: any(t.shape == p.shape and t.dtype == p.dtype and torch.equal(t, p) for t in live)
             for name, p in probes.items()}
    print(json.dumps({"found": found, "replies": [len(r) for r in replies]}))
    """
)


def test_a_client_process_never_holds_a_dropped_block(tmp_path):
    """A client process loads no model and, having built the emulator and trained on it, holds no tensor of a
    middle block the emulator dropped, while it does hold the kept ones (the probe can see)."""
    b = _built()
    server = b.server(lambda params, r, on=None: {})
    e = _package(server)
    config = tmp_path / "offsite.yaml"
    config.write_text(json.dumps(b.cfg.model_dump(mode="json")))
    requests = [
        EmulatorRequest(1, e.digest, e.weights, e.initial),
        TrainRequest(1, params=server.inner.downlink.encode(e.initial, {}, None)[0]),
    ]
    paths = []
    for i, msg in enumerate(requests):
        paths.append(tmp_path / f"req{i}.bin")
        paths[-1].write_bytes(encode_message(msg))
    full = dict(b.bench.adapter.base_params)
    dropped = [n for n in full if ".layers.2." in n and n.endswith("proj.weight")]  # 4 blocks: 1 kept of 1..2
    kept = [n for n in full if ".layers.1." in n and n.endswith("proj.weight")]
    assert dropped and kept
    torch.save({n: full[n].detach().clone() for n in dropped + kept}, tmp_path / "probes.pt")
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_PROCESS, str(config), str(tmp_path / "probes.pt"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(result["found"][n] for n in kept), result
    assert not any(result["found"][n] for n in dropped), result
    assert all(n > 0 for n in result["replies"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter.method=prompt_tuning"], "use one of lora, ia3, bottleneck, bitfit, blocks"),
        (["adapter.layers=[0,1]"], "differs from the sandwich"),
        (["adapter.client_ranks=[4,8]"], "does not read adapter.client_ranks"),
        (["evaluation.per_client=true"], "per_client"),
    ],
)
def test_settings_offsite_cannot_honour_are_refused_naming_the_key(overrides, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        tiny_config(*OFFSITE, *overrides)


def test_the_adapter_lives_on_the_sandwich_blocks_by_default():
    cfg = tiny_config(*OFFSITE, "paradigm.bottom=2", "paradigm.top=1", "model.name=tiny-llama-deep")
    from fedtune.config import resolve

    assert resolve(cfg).adapter.layers == [0, 1, -1]


def test_a_sandwich_the_model_cannot_hold_is_refused_at_setup():
    with pytest.raises(ConfigError, match="leave none"):
        build(tiny_config(*OFFSITE, "paradigm.bottom=2", "paradigm.top=2")).server(lambda p, r, on=None: {})
