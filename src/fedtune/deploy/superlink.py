"""``python -m fedtune.deploy.superlink ARGS``: ``flower-superlink ARGS`` serving only its fleet API to the network.

flwr 1.41 serves every SuperLink API on one HTTP listener: the fleet API (SuperNodes), the Control
API (enrol a node key, list runs, submit a run), the runtime API of the ServerApp (unauthenticated
in subprocess isolation), ``/docs`` and ``/openapi.json``. It cannot bind them apart, and without
flwr.ee the Control API has no authentication: on a network address, anyone holding the CA
certificate could enrol a key of their own, or submit a run, i.e. code the coordinator machine executes.

fedtune enrols keys and submits its run from the coordinator machine, and Flower's SuperExec
connects locally too. So this wrapper has Flower build its app behind a guard: a peer on another
machine reaches only ``/v1/fleet/...`` (TLS and enrolled keys) and ``/health``, and gets 404 for
anything else; connections from this machine reach everything. "This machine" is a loopback peer,
or, when the SuperLink listens on one specific address, a peer at that very address (a local
connection to it comes from it; fedtune's Control client and the SuperExec connect there then).
It refuses to start if Flower no longer builds its app where the guard hooks in.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FLEET_PREFIX = "/v1/fleet/"
PUBLIC_PATHS = frozenset({"/health"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
NOT_FOUND = json.dumps({"detail": "Not Found"}, separators=(",", ":")).encode()  # as FastAPI answers unknown paths


def _ip(host: str) -> IPAddress | None:
    """host as an address (IPv4-mapped IPv6 as IPv4); None if it is not one."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_local(peer: str | None, own: frozenset[IPAddress] = frozenset()) -> bool:
    """Whether a peer address is this machine: loopback, or one of own. No address: not local."""
    addr = _ip(peer) if peer else None
    return addr is not None and (addr.is_loopback or addr in own)


def is_public(path: str) -> bool:
    """Whether any peer may reach path: the fleet API and the health check."""
    return path.startswith(FLEET_PREFIX) or path in PUBLIC_PATHS


def own_addresses(host: str) -> frozenset[IPAddress]:
    """Besides loopback, the addresses whose peers are this machine, for a SuperLink listening on host.

    A wildcard listener is reached locally over loopback; one bound to a specific address only at
    that address, from that address (the kernel drops a packet from outside with a local source address).
    """
    host = host.strip("[]")
    if host in WILDCARDS:
        return frozenset()
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return frozenset()
    return frozenset(a for a in (_ip(str(info[4][0])) for info in infos) if a is not None and not a.is_unspecified)


class FleetOnly:
    """ASGI middleware: peers other than this machine reach only the public paths; 404 elsewhere."""

    def __init__(self, app: ASGIApp, own: Iterable[IPAddress] = ()) -> None:
        self.app = app
        self.own = frozenset(own)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if not is_public(scope.get("path", "")) and not is_local(client[0] if client else None, self.own):
                await _refuse(scope, send)
                return
        await self.app(scope, receive, send)  # lifespan, and everything allowed


async def _refuse(scope: Scope, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(NOT_FOUND)).encode())]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": NOT_FOUND})


def guard_flower(own: Iterable[IPAddress] = ()) -> Callable[[], None]:
    """Make Flower build its SuperLink app behind FleetOnly; Flower's ``flower-superlink`` entry point.

    RuntimeError if Flower's internals moved: no ``flwr.superlink.main.create_app`` to wrap. As a
    second check, uvicorn refuses to serve an app that is not guarded (e.g. one Flower built elsewhere).
    """
    try:
        import flwr.superlink.main as flwr_app
        import uvicorn
        from flwr.superlink.cli.flower_superlink import flower_superlink
    except ImportError as exc:
        raise RuntimeError(f"cannot guard Flower's SuperLink: {exc} (checked against flwr 1.41)") from exc
    create_app = getattr(flwr_app, "create_app", None)
    load = getattr(uvicorn.Config, "load", None)
    if create_app is None or load is None:
        raise RuntimeError(
            "cannot guard Flower's SuperLink: flwr.superlink.main.create_app or uvicorn.Config.load is gone "
            "(checked against flwr 1.41); refusing to serve its Control API unguarded"
        )
    own = frozenset(own)

    def guarded_app(*args: Any, **kwargs: Any) -> FleetOnly:
        return FleetOnly(create_app(*args, **kwargs), own)

    def checked_load(config: uvicorn.Config) -> None:
        if not isinstance(config.app, FleetOnly):
            raise RuntimeError(
                "Flower's SuperLink app was not built by flwr.superlink.main.create_app (flwr changed since "
                "1.41): refusing to serve its Control API unguarded"
            )
        load(config)

    flwr_app.create_app = guarded_app
    uvicorn.Config.load = checked_load
    return flower_superlink


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperLink with argv (default: this command's arguments), guarded."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")  # flwr 1.41's default
    host = parser.parse_known_args(argv)[0].host
    flower_superlink = guard_flower(own_addresses(host))
    sys.argv = ["flower-superlink", *argv]  # Flower parses sys.argv and names itself after argv[0]
    flower_superlink()


if __name__ == "__main__":
    main()
