"""fedtune's Flower ServerApp and ClientApp: Flower carries the bytes, fedtune does the rest.

Every fedtune message (a safetensors blob, bf16 intact, byte counts exact) travels as one raw
uint8 ``Array`` (Flower splits Arrays into chunks, so payloads over 1 GB pass) with the target
client's fedtune id beside it. Flower starts a new ClientApp process per message, so the ClientApp
holds nothing: it hands the payload to the long-lived ``fedtune client`` worker on the same
machine (a local socket named in the node config), which keeps the model loaded and the client's
state. This module is imported in every such process, so it imports nothing heavy at the top.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

PAYLOAD, META = "fedtune", "fedtune-meta"  # record names in a Flower message
MESSAGE_TYPE = "query"  # fedtune messages say what they are; Flower's type is only routing

server_app = ServerApp()
client_app = ClientApp()


def pack(payload: bytes, meta: dict[str, int | str]) -> RecordDict:
    array = Array(dtype="uint8", shape=(len(payload),), stype="raw", data=payload)
    return RecordDict({PAYLOAD: ArrayRecord({"payload": array}), META: ConfigRecord(dict(meta))})


def unpack(content: RecordDict) -> tuple[bytes, dict]:
    return content[PAYLOAD]["payload"].data, dict(content[META])


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedtune.runtime.flower.coordinator_app import serve  # heavy: torch, transformers

    serve(grid, str(context.run_config["spec"]))


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    from fedtune.runtime.flower.local_worker import ask_worker

    payload, meta = unpack(msg.content)
    cfg = context.node_config
    if "hello" in meta:  # insecure mode: the coordinator asks who this is
        return Message(pack(b"", {"name": str(cfg["name"])}), reply_to=msg)
    reply = ask_worker(str(cfg["worker"]), bytes.fromhex(str(cfg["worker-key"])), int(meta["client-id"]), payload)
    return Message(pack(reply, {"client-id": int(meta["client-id"])}), reply_to=msg)
