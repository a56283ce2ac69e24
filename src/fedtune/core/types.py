"""Types every layer shares: named tensors, a client's namespaced state, and what a runtime carries.

Runtimes move only ``Envelope``s (client id + bytes); each paradigm declares its own message
dataclasses (``fedtune.paradigms.*.messages``) and ``fedtune.wire.messages`` turns them into bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

Params = dict[str, torch.Tensor]  # parameter name -> tensor (an adapter state or a delta)


class Tiled(dict):
    """Named tensors known, by how they were made, to be contiguous views tiling ``buffer`` (Σ numel,) back
    to back in this order, all of its dtype: whole-adapter arithmetic and checks then run on the buffer in
    one kernel (``aggregation.flat``). Read-only, so the buffer cannot go stale; ``dict(t)`` is a plain,
    mutable copy. Made only by ``wire.link.Link.decode`` (no codecs) and ``aggregation.flat.unflatten``."""

    def __init__(self, items: Any, buffer: torch.Tensor):
        super().__init__(items)
        self.buffer = buffer

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a Tiled dict of tensors is read-only; copy it with dict(...) to change it")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)  # pickles as a plain dict


# A client's persistent state: owner -> its tensors. Each piece has one owner and its own namespace:
# "held" (the adapter a client holds, downlink updates), "residual" (uplink error feedback),
# "scaffold" (SCAFFOLD's c_i), "kd" (KD: the adapter a client keeps as its own).
ClientState = dict[str, Params]

# The owner of what a client keeps that no repeated round may roll back (secure aggregation's record of the
# rounds it sent a masked input in): a deployed client's store keeps it apart from its per-round states and
# hands the newest with every one of them.
DURABLE = "durable"

_LEGACY_OWNERS = {"control": "scaffold"}  # checkpoints written before owners had names of their own


def flatten_state(state: ClientState) -> Params:
    """``{"owner/key": tensor}``, for safetensors files (checkpoints, a deployed client's state store)."""
    for owner in state:
        if "/" in owner or not owner:
            raise ValueError(f"client-state owner {owner!r} must be a non-empty name without '/'")
    return {f"{owner}/{key}": t for owner, part in state.items() for key, t in part.items()}


def unflatten_state(flat: Params) -> ClientState:
    """Inverse of flatten_state; also reads the flat ``control/``, ``residual/``, ``held/`` keys of old checkpoints."""
    state: ClientState = {}
    for name, t in flat.items():
        owner, sep, key = name.partition("/")
        if not sep:
            raise ValueError(f"client-state tensor {name!r} has no owner (expected 'owner/key')")
        state.setdefault(_LEGACY_OWNERS.get(owner, owner), {})[key] = t
    return state


@dataclass(frozen=True)
class Envelope:
    """What a runtime carries: an addressed, already-encoded message."""

    client_id: int
    payload: bytes


@dataclass
class ServerState:
    """Everything the server needs to continue after ``round``: what a checkpoint holds.

    ``params``: the global adapter ({} when the paradigm has none, e.g. KD with logits on the
    downlink); ``algorithm``: the paradigm's explicit algorithm state (parameter sharing: the
    aggregator's; KD: the consensus it will send); ``clients``: simulated clients' persistent state,
    held by the runtime; ``replicas``: with downlink updates, what each client holds.
    """

    round: int
    params: Params
    algorithm: NamedTuple
    history: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[int, ClientState] = field(default_factory=dict)
    replicas: dict[int, Params] = field(default_factory=dict)
