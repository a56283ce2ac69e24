"""fedtune's Flower ServerApp and ClientApp: Flower carries the bytes, fedtune does the rest.

Messages travel as ``fedtune.runtime.flower_wire`` packs them (a large one in pieces). The ServerApp
runs the experiment; the ClientApp is only the name Flower's app bundle needs: ``fedtune client``
answers the coordinator itself (deploy/node.py) and never runs code from the bundle. This module is
imported by the SuperLink's ServerApp process, so it imports nothing heavy at the top.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedtune.deploy.coordinator_app import serve  # heavy: torch, transformers

    serve(grid, str(context.run_config["spec"]))


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    raise RuntimeError(
        "fedtune clients join with `fedtune client`, which talks to the SuperLink itself; a Flower SuperNode "
        "does not serve this federation"
    )
