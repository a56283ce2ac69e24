"""What a paradigm declares about itself: its settings, the shared keys it reads, what it supports.

A paradigm is one plug-in object (``Paradigm``), declared in ``fedtune/paradigms/NAME/__init__.py``
and registered by one line in ``core.registry.PARADIGMS`` (a paradigm outside the package is named
by its import path instead, ``paradigm: {name: "package.module:ATTRIBUTE"}``). The config asks it,
never ``paradigm == "x"``: its ``Settings`` validate the ``paradigm`` section, ``reads`` says which
of the keys only some paradigms use it reads (a key it does not read, set, is an error naming the
key and the paradigm), ``capabilities`` what it supports (an unsupported one asked for is an error
naming it), and ``check`` any rule of its own. Its server and client halves are built by the module
``setup`` names, imported only when a run starts: reading a config never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from fedtune.config.base import Strict
from fedtune.core.registry import PARADIGMS

RUNTIMES = ("in_process", "ray", "flower")


class ParadigmConfig(Strict):
    """A paradigm's own settings: ``paradigm: {name: NAME, ...}``; each paradigm subclasses it."""

    name: str = Field("parameter_sharing", description="the paradigm: a registered name, or package.module:ATTRIBUTE")

    def plugin(self) -> Paradigm:
        """The paradigm these settings are for."""
        return paradigm_of(self.name)


@dataclass(frozen=True)
class Capabilities:
    """What a paradigm supports; whatever it does not is refused when a config asks for it."""

    runtimes: tuple[str, ...] = RUNTIMES  # runtime.name values it runs under
    lanes: bool = True  # its clients may train in forked lanes (runtime.lanes > 1)
    gpu: bool = False  # its model and exchanges may live on a GPU (model.device)
    joint: bool = False  # several clients' adapters in one forward (runtime.joint_clients)
    client_dp: bool = False  # client-level DP (privacy.client_dp)
    secure_agg: bool = False  # secure aggregation (privacy.secure_aggregation)
    dp_sgd: bool = False  # record-level DP-SGD in the clients (privacy.dp_sgd)
    per_client_eval: bool = False  # clients evaluate on their own held-out share (evaluation.per_client)
    gradient_checkpointing: bool = False  # training.gradient_checkpointing
    zeroth_order: bool = False  # its clients may train without backprop (training.gradient=zeroth_order|forward)
    quantised_base: bool = False  # its model may load with a quantised base (model.quantization)
    continues_mid_round: bool = False  # its requests may continue a round (``continues``, wire/protocol.py)
    client_base: bool = True  # a client process loads the base model (False: it gets its model in messages)


@dataclass(frozen=True)
class Paradigm:
    """A paradigm, as the config, the registry and the docs see it.

    ``reads``: dotted prefixes of the paradigm-dependent keys (``experiment.PARADIGM_KEYS``) it reads;
    an entry starting with ``-`` takes a key back out (``"training", "-training.proximal_mu"``).
    ``setup``: the module with ``server(plan, bench, evaluate_adapter, weight_cap)`` and
    ``client(plan, bench, data, eval_set)`` (``paradigms/plan.py``; docs/architecture.md, "Adding a paradigm").
    ``extends``: a paradigm that reuses another's halves (offsite-tuning wraps parameter sharing's round
    around an emulator) names it here; it is then the one plug-in its package may import.
    """

    name: str
    summary: str
    settings: type[ParadigmConfig]
    reads: Sequence[str]
    capabilities: Capabilities
    setup: str
    check: Callable[[Any], None] | None = None  # its own rules on an ExperimentConfig: ValueError naming the key
    docs: str = ""  # its page under docs/, for error messages and the reference
    resolve: Callable[[Any], Any] | None = None  # its config-determined defaults: ExperimentConfig -> a new one
    extends: str | None = None  # the paradigm whose halves it builds on (the only plug-in it may import)

    def reads_key(self, key: str) -> bool:
        """Whether the paradigm reads dotted ``key``: the longest matching entry of ``reads`` decides."""
        best, verdict = -1, False
        for entry in self.reads:
            prefix, positive = (entry[1:], False) if entry.startswith("-") else (entry, True)
            if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
                best, verdict = len(prefix), positive
        return verdict

    def halves(self) -> Any:
        """The module that builds the server and client halves (imported here, on first use)."""
        return importlib.import_module(self.setup)


def paradigm_of(name: str) -> Paradigm:
    """The plug-in a paradigm name (or import path) stands for; ValueError saying what is allowed."""
    plugin = PARADIGMS.load(name)
    if not isinstance(plugin, Paradigm):
        raise ValueError(f"paradigm {name!r} names a {type(plugin).__name__}, not a fedtune.config.paradigm.Paradigm")
    return plugin
