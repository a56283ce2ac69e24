"""Downlink updates: send each client the change from the adapter it holds, not the adapter.

The server keeps a replica of what each client holds (``compression.downlink_updates``). Every
client starts from the same seeded initial adapter, so no full adapter ever has to travel: a
client receives C(view - replica), and both ends then set replica <- replica + decode(...) with
the same arithmetic, so they stay bit-identical. Whatever C dropped stays in view - replica and
is sent later: error feedback comes for free. Clients that took part in the same rounds hold
the same replica, so replicas are shared objects (with full participation, one in all).
"""

from __future__ import annotations

import torch

from fedtune.core.types import Params
from fedtune.wire.link import Link, apply_change


class ReplicaDownlink:
    """Encode the global adapter for each client as a compressed change to its replica."""

    def __init__(self, link: Link, initial: Params, replicas: dict[int, Params] | None = None):
        self.link, self.initial = link, initial
        self.replicas: dict[int, Params] = dict(replicas or {})

    def encode(self, views: dict[int, Params], gen: torch.Generator) -> dict[int, Params]:
        """Wire tensors per client; each client's replica advances to what it will hold."""
        cache: dict[tuple[int, int], tuple[Params, Params]] = {}
        out: dict[int, Params] = {}
        for c in sorted(views):
            view, base = views[c], self.replicas.get(c, self.initial)
            key = (id(view), id(base))
            if key not in cache:
                wire, _ = self.link.encode({k: view[k] - base[k] for k in view}, {}, gen)
                change = self.link.decode(wire, view)
                cache[key] = (wire, apply_change(base, change))
            out[c], self.replicas[c] = cache[key]
        return out
