"""A FlowerTune challenge project as `flwr new` writes it (its pyproject.toml), with generated data of the
challenge dataset's schema."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.data.builtin.shaped import records

# challenge -> (static dataset, num-supernodes, fraction-fit), as the FlowerTune templates set them
TEMPLATES = {
    "general_nlp": ("vicgalle/alpaca-gpt4", 20, 0.1),
    "finance": ("FinGPT/fingpt-sentiment-train", 50, 0.05),
    "medical": ("medalpaca/medical_meadow_medical_flashcards", 20, 0.1),
    "code": ("flwrlabs/code-alpaca-20k", 10, 0.2),
}

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
dependencies = ["flwr[simulation]>=1.18.0", "flwr-datasets>=0.5.0", "peft==0.6.2"]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "{name}.server_app:app"
clientapp = "{name}.client_app:app"

[tool.flwr.app.config]
model.name = "mistralai/Mistral-7B-v0.3"
model.quantization = 4
model.gradient-checkpointing = true
model.lora.peft-lora-r = 32
model.lora.peft-lora-alpha = 64
train.save-every-round = 5
train.learning-rate-max = 5e-5
train.learning-rate-min = 1e-6
train.seq-length = 512
train.training-arguments.output-dir = ""
train.training-arguments.learning-rate = ""
train.training-arguments.per-device-train-batch-size = 16
train.training-arguments.gradient-accumulation-steps = 1
train.training-arguments.logging-steps = 10
train.training-arguments.num-train-epochs = 3
train.training-arguments.max-steps = 10
train.training-arguments.save-steps = 1000
train.training-arguments.save-total-limit = 10
train.training-arguments.gradient-checkpointing = true
train.training-arguments.lr-scheduler-type = "constant"
strategy.fraction-fit = {fraction}
strategy.fraction-evaluate = 0.0
num-server-rounds = 200

[tool.flwr.app.config.static]
dataset.name = "{dataset}"

[tool.flwr.federations]
default = "local-simulation"

[tool.flwr.federations.local-simulation]
options.num-supernodes = {clients}
options.backend.client-resources.num-cpus = 6
options.backend.client-resources.num-gpus = 1.0
"""


def challenge_project(tmp: Path, challenge: str, **edit: str) -> Path:
    """``tmp/<challenge>/pyproject.toml`` as the template writes it (``edit``: a placeholder's other value)."""
    dataset, clients, fraction = TEMPLATES[challenge]
    fields = {"name": f"flowertune-{challenge.replace('_', '-')}", "dataset": dataset, "clients": clients,
              "fraction": fraction} | edit  # fmt: skip
    path = tmp / challenge / "pyproject.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PYPROJECT.format(**fields))
    return path


def challenge_data(tmp: Path, challenge: str, n: int = 120) -> Path:
    """A local copy of the challenge's dataset: generated records of its schema (instruction, input, output)."""
    path = tmp / f"{challenge}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(f"flowertune_{challenge}", n)))
    return path
