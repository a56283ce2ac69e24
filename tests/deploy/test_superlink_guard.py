"""The SuperLink guard (deploy/superlink.py): over the network only the fleet API; everything from this machine."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from fedtune.deploy.superlink import FleetOnly, guard_flower, is_local, own_addresses

pytest.importorskip("flwr")

LOOPBACK = ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"]
REMOTE = ["192.0.2.2", "10.1.2.3", "2001:db8::7", "::ffff:192.0.2.2", "0.0.0.0", "::", "testclient", ""]
PUBLIC = ["/v1/fleet/pull-messages", "/v1/fleet/create-node", "/health"]
PRIVATE = [
    "/v1/control/register-node",
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/runtime/pull-messages",
    "/docs",
    "/openapi.json",
    "/",
    "/v1/fleet",
    "/v1/fleetX/create-node",
    "/health/x",
    "/v1/control/../fleet/x",
]


def _call(path: str, client: tuple[str, int] | None, own=frozenset(), kind: str = "http") -> tuple[list, list]:
    """Run one request through the guard; (what the inner app saw, what was sent back)."""
    seen, sent = [], []

    async def inner(scope, receive, send):
        seen.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "path": path, "client": client, "server": ("192.0.2.2", 9092), "headers": []}
    asyncio.run(FleetOnly(inner, own)(scope, receive, send))
    return seen, sent


def _refused(sent: list) -> bool:
    return sent[0]["status"] == 404 and json.loads(sent[1]["body"]) == {"detail": "Not Found"}


@pytest.mark.parametrize("host", LOOPBACK)
@pytest.mark.parametrize("path", PUBLIC + PRIVATE)
def test_this_machine_reaches_everything(host, path):
    seen, sent = _call(path, (host, 40000))
    assert len(seen) == 1 and sent[0]["status"] == 200


@pytest.mark.parametrize("host", REMOTE)
def test_the_network_reaches_only_the_fleet_api_and_health(host):
    for path in PUBLIC:
        seen, _ = _call(path, (host, 40000))
        assert len(seen) == 1, path
    for path in PRIVATE:
        seen, sent = _call(path, (host, 40000))
        assert not seen and _refused(sent), path


def test_no_client_address_is_not_this_machine():
    assert _call("/v1/control/list-runs", None)[0] == []
    assert len(_call("/v1/fleet/pull-messages", None)[0]) == 1


def test_a_specific_listen_address_counts_as_this_machine():
    own = frozenset({ipaddress.ip_address("192.0.2.2")})
    assert len(_call("/v1/control/start-run", ("192.0.2.2", 40000), own)[0]) == 1
    assert len(_call("/v1/control/start-run", ("::ffff:192.0.2.2", 40000), own)[0]) == 1
    assert _call("/v1/control/start-run", ("192.0.2.3", 40000), own)[0] == []


def test_own_addresses_are_empty_for_a_wildcard_listener():
    assert own_addresses("0.0.0.0") == own_addresses("::") == own_addresses("[::]") == frozenset()
    assert own_addresses("192.0.2.2") == {ipaddress.ip_address("192.0.2.2")}
    assert own_addresses("[2001:db8::7]") == {ipaddress.ip_address("2001:db8::7")}
    assert is_local("::1") and is_local("::ffff:127.0.0.1") and not is_local("192.0.2.2") and not is_local(None)


def test_lifespan_passes_through():
    seen, _ = _call("", None, kind="lifespan")
    assert len(seen) == 1


def test_a_websocket_from_the_network_is_closed_before_it_opens():
    seen, sent = _call("/v1/control/stream", ("192.0.2.2", 40000), kind="websocket")
    assert not seen and sent == [{"type": "websocket.close", "code": 1008}]


def test_flower_builds_its_app_guarded_and_uvicorn_serves_nothing_unguarded(monkeypatch):
    import flwr.superlink.main as flwr_app
    import uvicorn

    async def app(scope, receive, send):
        pass

    monkeypatch.setattr(flwr_app, "create_app", lambda *args, **kwargs: app)
    monkeypatch.setattr(uvicorn.Config, "load", uvicorn.Config.load)  # restored afterwards
    guard_flower()
    built = flwr_app.create_app("config", superlink_lifespan_class=None)
    assert isinstance(built, FleetOnly) and built.app is app
    with pytest.raises(RuntimeError, match="unguarded"):
        uvicorn.Config(app).load()
    uvicorn.Config(built).load()


def test_it_refuses_to_run_unguarded_if_flower_moved_its_app(monkeypatch):
    import flwr.superlink.main as flwr_app

    monkeypatch.delattr(flwr_app, "create_app")
    with pytest.raises(RuntimeError, match="create_app"):
        guard_flower()
