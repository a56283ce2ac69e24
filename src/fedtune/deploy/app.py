"""fedtune's Flower ServerApp and ClientApp: Flower carries the bytes, fedtune does the rest.

Messages travel as ``fedtune.runtime.flower_wire`` packs them. Flower starts a new ClientApp
process per message, so the ClientApp
holds nothing: it hands the payload to the long-lived ``fedtune client`` worker on the same
machine (a local socket named in the node config), which keeps the model loaded and the client's
state. This module is imported in every such process, so it imports nothing heavy at the top.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.runtime.flower_wire import pack, unpack

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedtune.deploy.coordinator_app import serve  # heavy: torch, transformers

    serve(grid, str(context.run_config["spec"]))


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    from fedtune.deploy.local_worker import ask_worker

    payload, meta = unpack(msg.content)
    cfg = context.node_config
    if "hello" in meta:  # insecure mode: the coordinator asks who this is
        return Message(pack(b"", {"name": str(cfg["name"])}), reply_to=msg)
    key = Path(str(cfg["worker-key-file"])).read_bytes()
    reply = ask_worker(str(cfg["worker"]), key, int(meta["client-id"]), payload)
    return Message(pack(reply, {"client-id": int(meta["client-id"])}), reply_to=msg)
