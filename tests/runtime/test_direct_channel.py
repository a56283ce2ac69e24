"""The direct channel: frames, signed requests, and a coordinator's hub served to real clients over loopback TLS.

Every request to the hub is untrusted: one not signed by an enrolled key, stale, replayed, altered,
too large, or answering a message sent to someone else gets nothing and changes nothing; a frame
from an enrolled client that is not well formed fails that client's exchange with the reason.
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtune.deploy.certs import write_certs
from fedtune.deploy.direct_link import DirectLink, DirectLoop
from fedtune.deploy.fleet import load_key
from fedtune.runtime import direct_wire as dw
from fedtune.runtime import flower_wire as wire
from fedtune.runtime.direct_grid import DirectGrid
from fedtune.runtime.direct_hub import Hub, enrolled_keys

META = st.dictionaries(
    st.text(max_size=dw.KEY_MAX),
    st.integers(-(2**63), 2**63 - 1) | st.text(max_size=50),
    max_size=8,
)


@given(meta=META, payload=st.binary(max_size=300))
def test_a_frame_comes_back_as_it_was_sent(meta, payload):
    assert dw.decode(dw.encode(meta, payload)) == (meta, payload)


@given(cut=st.integers(0, 40), junk=st.binary(max_size=40))
def test_a_malformed_frame_is_a_value_error_never_another(cut, junk):
    frame = dw.encode({"a": 1, "b": "x" * 10}, b"payload")
    for bad in (frame[:cut], junk, frame[:8] + junk, dw.MAGIC + b"\xff\xff\xff\xff"):
        with contextlib.suppress(ValueError):
            dw.decode(bad)


@pytest.mark.parametrize(
    "meta", ['{"a": true}', '{"a": 1.5}', '{"a": [1]}', "[1]", '{"a": 18446744073709551616}', "[" * 5000]
)
def test_meta_is_flat_ints_and_short_strings(meta):
    raw = meta.encode()
    with pytest.raises(ValueError):
        dw.decode(dw.MAGIC + len(raw).to_bytes(4, "big") + raw)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Certificates and two enrolled clients, a hub serving them on loopback, and their links."""
    root = tmp_path_factory.mktemp("direct")
    write_certs(root, ["127.0.0.1", "localhost"], ["alice", "bob", "mallory"])
    keys = enrolled_keys(root / "clients")
    keys = {der: v for der, v in keys.items() if v[0] != "mallory"}  # mallory holds a key nobody enrolled
    hub = Hub(keys, max_frame=2**20, take_s=0.3)
    port = hub.start("127.0.0.1", 0, root / "server.pem", root / "server.key")
    links = {
        n: DirectLink("127.0.0.1", port, root / "ca.crt", *load_key(root / "clients" / f"{n}.key"))
        for n in ("alice", "bob", "mallory")
    }
    yield hub, links, root
    for link in links.values():
        link.close()
    hub.stop()


def _post(link: DirectLink, path: str, body: bytes, headers: dict) -> httpx.Response:
    return link.client.post(link.base + path, content=body, headers=headers)


def _signature(link: DirectLink, headers: dict) -> str:
    """``link``'s key's signature over what ``headers`` sign for a take."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    text = dw.signed_text("POST", "/take", headers[dw.TIME], headers[dw.NONCE], b"")
    return base64.b64encode(link.key.sign(text, ec.ECDSA(hashes.SHA256()))).decode()


def test_a_message_goes_to_its_client_only_and_its_reply_comes_back(federation):
    hub, links, _ = federation
    msg_id = hub.put("alice", {"k": 1}, b"request")
    assert links["bob"].take() is None  # held open, then nothing: it was not for bob
    meta, payload = links["alice"].take()
    assert payload == b"request" and meta == {"k": 1, dw.ID: msg_id}
    links["bob"].reply(msg_id, {"evil": 1}, b"forged")  # 409: not bob's to answer
    assert hub.collect([msg_id]) == []
    links["alice"].reply(msg_id, {"r": 2}, b"reply")
    assert hub.collect([msg_id]) == [(msg_id, "alice", ({"r": 2}, b"reply"), None)]
    links["alice"].reply(msg_id, {"r": 3}, b"again")  # answered already: nothing changes
    assert hub.collect([msg_id]) == []


def test_requests_not_signed_by_an_enrolled_key_get_nothing(federation):
    hub, links, _ = federation
    msg_id = hub.put("alice", {}, b"secret")
    alice = links["alice"]
    with pytest.raises(httpx.HTTPStatusError) as refused:
        links["mallory"].take()
    assert refused.value.response.status_code == 401 and "not enrolled" in refused.value.response.text
    good = dw.sign(alice.key, alice.der, "POST", "/take", b"")
    cases = {  # what -> (path, body, headers)
        "no headers": ("/take", b"", {}),
        "altered body": ("/reply", b"FTD1tampered", dw.sign(alice.key, alice.der, "POST", "/reply", b"FTD1original")),
        "wrong path": ("/take", b"", dw.sign(alice.key, alice.der, "POST", "/reply", b"")),
        "stale": ("/take", b"", {**good, dw.TIME: f"{time.time() - 3 * dw.SKEW_S:.3f}"}),
        "bad nonce": ("/take", b"", {**good, dw.NONCE: "x" * 32}),
        "bob's signature on alice's key": ("/take", b"", {**good, dw.SIGNATURE: _signature(links["bob"], good)}),
    }
    for what, (path, body, headers) in cases.items():
        res = _post(alice, path, body, headers)
        assert res.status_code == 401, (what, res.status_code, res.text)
    first = _post(alice, "/take", b"", good)
    assert first.status_code == 200 and dw.decode(first.content)[1] == b"secret"
    replayed = _post(alice, "/take", b"", good)
    assert replayed.status_code == 401 and "replayed" in replayed.text
    hub.forget([msg_id])


def test_a_reply_larger_than_the_hub_reads_is_refused_unread(federation):
    hub, links, _ = federation
    msg_id = hub.put("alice", {}, b"")
    links["alice"].take()
    with pytest.raises(httpx.HTTPStatusError) as refused:
        links["alice"].reply(msg_id, {}, b"\0" * (hub.max_frame + 1))
    assert refused.value.response.status_code == 413
    assert hub.collect([msg_id]) == []
    hub.forget([msg_id])


def test_an_unreadable_reply_fails_that_clients_exchange_with_the_reason(federation):
    hub, links, _ = federation
    msg_id = hub.put("bob", {}, b"")
    other = hub.put("alice", {}, b"")
    links["bob"].take()
    bob = links["bob"]
    body = b"FTD1\x00\x00\x00\x05[[[[["
    res = _post(bob, "/reply", body, dw.sign(bob.key, bob.der, "POST", "/reply", body))
    assert res.status_code == 400
    [(got, name, reply, failed)] = hub.collect([msg_id, other])
    assert (got, name, reply) == (msg_id, "bob", None) and "unreadable direct reply" in failed
    hub.forget([other])


class _FlowerGrid:
    """Stands for Flower's Grid: lists alice and carol (who never opened the channel), takes what is not sent
    directly."""

    def __init__(self):
        self.pushed = []

    def get_nodes(self):
        from types import SimpleNamespace

        return [SimpleNamespace(node_id=11, name="alice"), SimpleNamespace(node_id=12, name="carol")]

    def push_messages(self, messages):
        self.pushed += messages
        return [f"flower-{len(self.pushed)}-{i}" for i in range(len(messages))]

    def pull_messages(self, ids):
        return []


def test_the_grid_sends_directly_to_a_connected_client_and_through_flower_otherwise(federation, flower_task):
    from flwr.app import Message

    hub, _, root = federation
    flower = _FlowerGrid()
    grid = DirectGrid(flower, hub)
    grid.get_nodes()
    stop = threading.Event()
    answer = lambda m, p: ({"seen": m["k"]}, p[::-1])  # noqa: E731  (alice's client, reversing)
    loop = DirectLoop("127.0.0.1", root / "ca.crt", *load_key(root / "clients" / "alice.key"), answer, stop)
    loop.follow(hub.port)
    until = time.monotonic() + 10
    while not hub.connected("alice") and time.monotonic() < until:
        time.sleep(0.01)
    try:
        messages = [
            Message(content=wire.pack(b"abc", {"k": 7}), dst_node_id=11, message_type=wire.MESSAGE_TYPE),
            Message(content=wire.pack(b"xyz", {"k": 8}), dst_node_id=12, message_type=wire.MESSAGE_TYPE),
        ]
        ids = grid.push_messages(messages)
        assert ids[1].startswith("flower-") and flower.pushed[0].content[wire.META][dw.PORT] == hub.port
        replies = []
        until = time.monotonic() + 10
        while not replies and time.monotonic() < until:
            grid.wait(0.1)
            replies = grid.pull_messages(ids)
        [reply] = replies
        assert (reply.metadata.reply_to_message_id, reply.metadata.src_node_id) == (ids[0], 11)
        assert wire.unpack(reply.content) == (b"cba", {"seen": 7})
    finally:
        stop.set()
        loop.close()


def test_one_client_cannot_hold_more_than_its_share_of_open_takes(federation):
    from fedtune.runtime.direct_hub import MAX_TAKES

    hub, links, _ = federation
    bob = links["bob"]
    statuses = []

    def hold():
        res = _post(bob, "/take", b"", dw.sign(bob.key, bob.der, "POST", "/take", b""))
        statuses.append(res.status_code)

    until = time.monotonic() + 5
    while hub.takers["bob"] and time.monotonic() < until:  # none left open by an earlier test
        time.sleep(0.005)
    held = [threading.Thread(target=hold) for _ in range(MAX_TAKES)]
    for t in held:
        t.start()
    while hub.takers["bob"] < MAX_TAKES and time.monotonic() < until:
        time.sleep(0.005)
    res = _post(bob, "/take", b"", dw.sign(bob.key, bob.der, "POST", "/take", b""))
    for t in held:
        t.join()
    assert res.status_code == 429 and statuses == [204] * MAX_TAKES


def test_a_port_in_use_is_an_error_at_once(federation):
    hub, _, root = federation
    other = Hub(hub.keys, max_frame=1)
    started = time.monotonic()
    with pytest.raises(OSError):
        other.start("127.0.0.1", hub.port, root / "server.pem", root / "server.key")
    assert time.monotonic() - started < 5


def test_a_request_the_client_cannot_serve_fails_its_exchange_with_the_clients_reason(federation):
    hub, _, root = federation
    stop = threading.Event()

    from fedtune.deploy.node import answer_direct

    def refuse(meta, payload):  # a message naming no client id: the node's own answer refuses it
        return answer_direct(meta, payload, None, "bob")

    loop = DirectLoop("127.0.0.1", root / "ca.crt", *load_key(root / "clients" / "bob.key"), refuse, stop)
    loop.follow(hub.port)
    try:
        msg_id = hub.put("bob", {}, b"")
        until, got = time.monotonic() + 10, []
        while not got and time.monotonic() < until:
            hub.wait(0.1)
            got = hub.collect([msg_id])
        [(_, name, reply, failed)] = got
        assert name == "bob" and reply is None and "fedtune client: ValueError: a client id must be" in failed
    finally:
        stop.set()
        loop.close()


def test_a_client_that_never_opens_the_channel_is_named_once(federation, flower_task, caplog):
    from flwr.app import Message

    from fedtune.runtime.direct_grid import UNOPENED_WARN

    hub = federation[0]
    grid = DirectGrid(_FlowerGrid(), hub)
    grid.get_nodes()
    for _ in range(2 * UNOPENED_WARN):
        msg = Message(content=wire.pack(b"", {}), dst_node_id=12, message_type=wire.MESSAGE_TYPE)
        assert grid.push_messages([msg])[0].startswith("flower-")
    said = [r.getMessage() for r in caplog.records if "has not opened the direct channel" in r.getMessage()]
    assert len(said) == 1 and "carol" in said[0] and str(hub.port) in said[0]
