"""A client's link to the coordinator over Flower's Fleet API: the calls a SuperNode makes, made from here.

``fedtune client`` does not run Flower's SuperNode: that process sleeps 3 s whenever a pull finds
nothing, starts a fresh ClientApp process for every message and serves those processes an
unauthenticated local API. It talks to the SuperLink itself, with the same TLS, the same enrolment
key (every request signed with it) and the same heartbeats, from the one process that holds the
model. Nothing of Flower's is listened on locally, and no code arrives from the coordinator (the
SuperNode would fetch and run the run's app bundle; this link never asks for it).

Everything here that is Flower's own and not its public API (the Fleet HTTP client, its
interceptors, request messages and object transfer helpers) is named in ``FLOWER_PARTS``; ``check``
says which of them moved when a Flower other than the tested range is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedtune.runtime.polling import OBJECT_WAIT_S

log = logging.getLogger("fedtune")

TESTED_FLWR = ">=1.41,<1.42"  # the range pyproject.toml allows; FLOWER_PARTS were checked against it
FLOWER_PARTS = {  # module -> names this file uses from it
    "flwr.supernode.fleet_http_client": ("FleetHttpClient",),
    "flwr.supernode.node_auth_http_interceptor": ("NodeAuthHttpInterceptor",),
    "flwr.supercore.interceptors.http.runtime_version": ("RuntimeVersionHttpInterceptor",),
    "flwr.supercore.heartbeat": ("HeartbeatSender",),
    "flwr.supercore.primitives.asymmetric": ("generate_key_pairs", "public_key_to_bytes"),
    "flwr.supercore.inflatable.inflatable_utils": ("pull_and_inflate_object_from_tree", "push_objects"),
    "flwr.supercore.inflatable.inflatable_object": (
        "get_all_nested_objects",
        "get_object_tree",
        "no_object_id_recompute",
    ),
    "flwr.supercore.inflatable.inflatable_protobuf_utils": (
        "make_confirm_message_received_fn_protobuf",
        "make_pull_object_fn_protobuf",
        "make_push_object_fn_protobuf",
    ),
    "flwr.common.serde": ("message_from_proto", "message_to_proto"),
    "flwr.common.constant": ("HEARTBEAT_DEFAULT_INTERVAL",),
    "flwr.app.message": ("remove_content_from_message",),
    "flwr.proto.fleet_pb2": (
        "ActivateNodeRequest",
        "DeactivateNodeRequest",
        "PullMessagesRequest",
        "PushMessagesRequest",
        "RegisterNodeFleetRequest",
    ),
    "flwr.proto.heartbeat_pb2": ("SendNodeHeartbeatRequest",),
    "flwr.proto.node_pb2": ("Node",),
    "flwr.supercore.error": ("FlowerError",),
}
FLEET_CALLS = ("ActivateNode", "DeactivateNode", "RegisterNode", "SendNodeHeartbeat", "PullMessages", "PushMessages")
FLEET_CALLS += ("PullObject", "PushObject", "ConfirmMessageReceived")


def moved_flower_parts() -> list[str]:
    """What of ``FLOWER_PARTS`` (and the Fleet client's calls) the installed Flower lacks; [] when all is there."""
    missing = []
    for module, names in FLOWER_PARTS.items():
        try:
            found = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        missing += [f"{module}.{n}" for n in names if not hasattr(found, n)]
    if not missing:
        from flwr.supernode.fleet_http_client import FleetHttpClient

        missing += [f"FleetHttpClient.{c}" for c in FLEET_CALLS if not hasattr(FleetHttpClient, c)]
    return missing


def check() -> None:
    """Raise ImportError naming what moved if the installed Flower lacks a part this link uses."""
    missing = moved_flower_parts()
    if missing:
        from importlib.metadata import version

        raise ImportError(
            f"fedtune's client link was checked against flwr{TESTED_FLWR}; flwr {version('flwr')} lacks "
            f"{', '.join(missing)}. Install a flwr in that range (pip install 'fedtune[flower]')"
        )


class Refused(Exception):
    """The SuperLink will not take this client: its key is not enrolled, or its node is still listed online."""


@dataclass
class Incoming:
    """One message the coordinator sent this client, pulled with its content."""

    message: object  # flwr.app.Message
    run_id: int


class FleetLink:
    """One client's connection to a SuperLink's Fleet API: activate, pull, push, heartbeats, deactivate."""

    def __init__(self, address: str, ca: Path | None, key: Path | None):
        """``ca`` None: plain text (no enrolment: the node registers a fresh key of its own)."""
        check()
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
        from flwr.supercore.primitives.asymmetric import generate_key_pairs
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        self.registers = key is None
        self.private_key, self.public_key = load_key(key) if key is not None else generate_key_pairs()
        self.client = FleetHttpClient.from_server_address(
            address,
            ca is None,
            str(ca) if ca is not None else None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                NodeAuthHttpInterceptor(self.private_key, self.public_key),
            ],
        )
        self.node = None
        self.heartbeats = None

    # ---- joining and leaving

    def activate(self) -> int:
        """Join: the node id the SuperLink knows this key by. Refused if it will not take this key now;
        httpx errors for transport trouble."""
        from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
        from flwr.proto.fleet_pb2 import ActivateNodeRequest, RegisterNodeFleetRequest
        from flwr.proto.node_pb2 import Node
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        raw = public_key_to_bytes(self.public_key)
        try:
            if self.registers:
                self.client.RegisterNode(RegisterNodeFleetRequest(public_key=raw))
            res = self.client.ActivateNode(
                ActivateNodeRequest(public_key=raw, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL)
            )
        except httpx.HTTPStatusError as exc:
            if 400 <= exc.response.status_code < 500:
                raise Refused(_flower_error(exc)) from None
            raise
        self.node = Node(node_id=res.node_id)
        self.heartbeats = HeartbeatSender(self._heartbeat)
        self.heartbeats.start()
        return int(res.node_id)

    def deactivate(self) -> None:
        """Leave at once (the SuperLink lists this node offline without waiting for heartbeats to stop)."""
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest

        if self.heartbeats is not None and self.heartbeats.is_running:
            self.heartbeats.stop()
        if self.node is not None:
            with contextlib.suppress(httpx.HTTPError, RuntimeError):
                self.client.DeactivateNode(DeactivateNodeRequest(node_id=self.node.node_id))
        self.node = None

    def close(self) -> None:
        self.deactivate()
        self.client._client.close()  # the httpx client under Flower's protobuf client

    def _heartbeat(self) -> bool:
        from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
        from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest

        if self.node is None:
            return False
        try:
            res = self.client.SendNodeHeartbeat(
                SendNodeHeartbeatRequest(node=self.node, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL)
            )
        except httpx.HTTPError:
            return False  # the node loop sees the trouble on its next pull and joins again
        return bool(res.success)

    # ---- messages

    def pull(self) -> Incoming | None:
        """The next message for this client, its content pulled and the SuperLink told; None if none waits."""
        from flwr.app import Message
        from flwr.common.serde import message_from_proto
        from flwr.proto.fleet_pb2 import PullMessagesRequest
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        res = self.client.PullMessages(PullMessagesRequest(node=self.node))
        if not res.messages_list:
            return None
        head, tree = message_from_proto(res.messages_list[0]), res.message_object_trees[0]
        run_id = head.metadata.run_id
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(self.client.PullObject, self.node, run_id),
            make_confirm_message_received_fn_protobuf(self.client.ConfirmMessageReceived, self.node, run_id),
            return_type=Message,
            initial_backoff=OBJECT_WAIT_S[0],
            backoff_cap=OBJECT_WAIT_S[1],
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # a deflated message lacks its own id
        return Incoming(message, run_id)

    def push(self, reply, run_id: int, took_s: float) -> None:
        """Send ``reply`` (a flwr Message answering a pulled one), its content object by object."""
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.proto.fleet_pb2 import PushMessagesRequest
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
            no_object_id_recompute,
        )
        from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf
        from flwr.supercore.inflatable.inflatable_utils import push_objects

        reply.metadata.__dict__["_message_id"] = reply.object_id
        with no_object_id_recompute():
            tree = get_object_tree(reply)
            res = self.client.PushMessages(
                PushMessagesRequest(
                    node=self.node,
                    messages_list=[message_to_proto(remove_content_from_message(reply))],
                    message_object_trees=[tree],
                    clientapp_runtime_list=[took_s],
                )
            )
            objects = get_all_nested_objects(reply)
            del reply
            push = make_push_object_fn_protobuf(self.client.PushObject, self.node, run_id, res.session_id)
            push_objects(objects, push, object_ids_to_push=set(res.objects_to_push))


def load_key(path: Path):
    """(private, public) EC key pair from an OpenSSH private key file (what ``fedtune certs`` writes)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from fedtune.core.errors import ConfigError

    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--key {path}: not a readable OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"--key {path}: an elliptic-curve key is needed (what `fedtune certs` writes)")
    return key, key.public_key()


def _flower_error(exc: httpx.HTTPStatusError) -> str:
    from flwr.supercore.error import FlowerError

    found = FlowerError.from_json(exc.response.text)
    return f"HTTP {exc.response.status_code}: " + (
        f"[{found.code}] {found.message}" if found else exc.response.text[:200]
    )
