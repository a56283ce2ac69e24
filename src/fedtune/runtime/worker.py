"""A simulation worker: one process, one base model, serving any simulated client it is handed.

Plain Python (no Ray import): the Ray pool wraps it as an actor. It builds its client side with the
recipe it is given (``assembly.simulation_handler``: the model, the seeded initial adapter and every
client's data, rebuilt from the config exactly as the server builds them), so a client's reply does
not depend on which worker served it. Given the base weights the driver put in the object store, it
builds its model over that one shared copy instead of loading its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import transformers

from fedtune.core.types import ClientState
from fedtune.models.shared import Exported, from_arrays, lend
from fedtune.runtime.base import Handle


class ClientWorker:
    def __init__(
        self, build: Callable[[], Handle], cwd: str | None, torch_threads: int, base: tuple[str, Exported] | None = None
    ):
        """``base``: (model name, exported base weights) mapped from the object store: the model is built over them."""
        if base is not None:
            self._base = base  # keeps the store's mapping alive as long as the model uses it
            lend(base[0], from_arrays(base[1]))
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative data and model paths mean what they meant to the server
        torch.set_num_threads(torch_threads)
        logging.getLogger("fedtune").setLevel(logging.ERROR)  # the server already logged the same setup
        transformers.utils.logging.disable_progress_bar()
        self._handle = build()

    def handle(self, client_id: int, payload: bytes, state: ClientState) -> tuple[bytes, ClientState]:
        return self._handle(client_id, payload, state)

    def pid(self) -> int:
        return os.getpid()
