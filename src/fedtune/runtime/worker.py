"""A simulation worker: one process, one base model, serving any simulated client it is handed.

Plain Python (no Ray import): the Ray pool wraps it as an actor. It rebuilds the model, the
seeded initial adapter and every client's data from the config, exactly as the server does, so
a client's reply does not depend on which worker served it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import transformers

from fedtune.types import Params


class ClientWorker:
    def __init__(self, cfg: dict[str, Any], cwd: str | None, torch_threads: int):
        from fedtune.assembly import build_client_data, build_workbench, make_handler
        from fedtune.config import ExperimentConfig
        from fedtune.data.prepare import prepare_federated_data

        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative data and model paths mean what they meant to the server
        torch.set_num_threads(torch_threads)
        logging.getLogger("fedtune").setLevel(logging.ERROR)  # the server already logged the same setup
        transformers.utils.logging.disable_progress_bar()
        config = ExperimentConfig.model_validate(cfg)
        config = config.model_copy(update={"output": config.output.model_copy(update={"progress": False})})
        bench = build_workbench(config, announce=False)
        data = prepare_federated_data(config.data, config.partition, config.seed)
        self.handler = make_handler(config, bench, build_client_data(data, bench.encoder, config))

    def handle(self, client_id: int, payload: bytes, state: Params) -> tuple[bytes, Params]:
        return self.handler.handle(client_id, payload, state)

    def pid(self) -> int:
        return os.getpid()
