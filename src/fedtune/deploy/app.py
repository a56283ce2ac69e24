"""fedtune's Flower ServerApp and ClientApp: Flower carries the bytes, fedtune does the rest.

Messages travel as ``fedtune.runtime.flower_wire`` packs them (a large one in pieces). Flower
starts a new ClientApp process per message, so the ClientApp holds nothing: it hands the payload,
or the piece, to the long-lived ``fedtune client`` worker on the same machine (a local socket named
in the node config), which keeps the model loaded, the client's state and any exchange in progress.
This module is imported in every such process, so it imports nothing heavy at the top.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.runtime.flower_wire import CLIENT, EXCHANGE, FETCH, RUN, pack, unpack

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedtune.deploy.coordinator_app import serve  # heavy: torch, transformers

    serve(grid, str(context.run_config["spec"]))


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    return answer(msg, context.node_config)


def answer(msg: Message, cfg: dict) -> Message:
    """The reply to one coordinator message: the worker's answer, or this client's name in insecure mode.

    A message of a pieced exchange (it names one) is one step of it at the worker, whose answer
    meta goes back beside its bytes; without an exchange, the whole payload is served in one go.
    """
    from fedtune.deploy.local_worker import ask_worker, ask_worker_op

    payload, meta = unpack(msg.content)
    if "hello" in meta:  # insecure mode: the coordinator asks who this is
        return Message(pack(b"", {"name": str(cfg["name"])}), reply_to=msg)
    key = Path(str(cfg["worker-key-file"])).read_bytes()
    client_id = int(meta[CLIENT])
    if EXCHANGE not in meta:
        reply = ask_worker(str(cfg["worker"]), key, client_id, payload, meta.get(RUN))
        return Message(pack(reply, {CLIENT: client_id}), reply_to=msg)
    op = "fetch" if FETCH in meta else "piece"
    said, data = ask_worker_op(str(cfg["worker"]), key, op, client_id, meta, payload)
    return Message(pack(data, {CLIENT: client_id, **said}), reply_to=msg)
