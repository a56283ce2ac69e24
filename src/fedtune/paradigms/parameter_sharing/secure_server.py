"""Secure aggregation, server side: the three exchanges after the train exchange, and the unmasked sum.

``secure_sum`` drives share keys -> masked input -> unmask (privacy/secagg.py) for the clients whose
public keys arrived with their train replies, and returns only Σ x_u over the clients whose masked
input arrived. The server never holds an individual update: it sees public keys, ciphertexts it
cannot open, masked vectors and shares of secrets of which it gets fewer than the threshold for
any one client's self-mask seed and mask key together. Fewer clients than the threshold at any
step fail the round (RunError, the last checkpoint intact) rather than reveal anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.core.errors import RunError
from fedtune.core.types import Params
from fedtune.paradigms.base import BadReply, Conversation, Exchange
from fedtune.paradigms.parameter_sharing.secure_messages import (
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
    as_bytes,
    roster_params,
)
from fedtune.privacy.secagg import CIPHERTEXT_BYTES, PRIME, SHARE_BYTES, FixedPoint, SecAggError, unmask_sum
from fedtune.wire.link import max_wire_bytes

Roster = dict[int, tuple[bytes, bytes]]


@dataclass(frozen=True)
class SecureAggregation:
    """A run's secure-aggregation settings (the aggregator takes the round's sum: ``Pipeline.aggregate_sum``)."""

    threshold: float  # share of the round's sampled clients that must remain at every step
    fixed_point: FixedPoint
    clip_norm: float  # clients clip their update to this L2 norm first (client-level DP); 0: no clipping
    noise_std: float  # distributed DP: std of the noise on the sum, added by the clients in shares; 0: none
    noise_seed: int  # privacy.noise_seed for the clients' noise shares (< 2^52), or -1: each client's own secret

    @property
    def noised_by_clients(self) -> bool:
        """Distributed DP: the sum arrives with its noise, added by the clients in shares."""
        return self.noise_std > 0

    def needed(self, sampled: int) -> int:
        """Clients that must remain at every step of a round that sampled ``sampled`` (at least 2)."""
        return max(2, math.ceil(self.threshold * sampled - 1e-9))

    def spec(self, sampled: int) -> dict[str, float]:
        fp = self.fixed_point
        return {
            "threshold": self.needed(sampled),
            "range": fp.range,
            "bits": fp.bits,
            "modulus_bits": fp.modulus_bits,
            "clip_norm": self.clip_norm,
            "noise_std": self.noise_std,
            "noise_seed": self.noise_seed,
        }


def read_keys(reply_keys: Params) -> tuple[bytes, bytes]:
    """A train reply's two public keys; BadReply unless both are 32-byte uint8 tensors."""
    if sorted(reply_keys) != ["c_pk", "s_pk"] or any(
        t.dtype != torch.uint8 or t.shape != (32,) for t in reply_keys.values()
    ):
        raise BadReply("secure aggregation: the reply must carry exactly its two 32-byte public keys")
    return as_bytes(reply_keys["c_pk"]), as_bytes(reply_keys["s_pk"])


def secure_sum(
    sec: SecureAggregation, r: int, roster: Roster, sampled: int, n_values: int
) -> Conversation[tuple[torch.Tensor, list[int], dict[str, Any]]]:
    """(Σ x_u as float32 (n_values,), the clients summed, metrics) for the clients of ``roster``."""
    need = sec.needed(sampled)
    fp = sec.fixed_point
    _enough(r, "sent public keys", roster, need)
    ids = sorted(roster)

    def read_shares(c: int, reply: ShareKeysReply) -> dict[int, bytes]:
        _same_round(r, reply.round)
        if sorted(reply.shares) != sorted(str(v) for v in ids):
            raise BadReply("secure aggregation: shares must be addressed to exactly the clients of the roster")
        if any(t.dtype != torch.uint8 or t.shape != (CIPHERTEXT_BYTES,) for t in reply.shares.values()):
            raise BadReply(f"secure aggregation: every ciphertext must be {CIPHERTEXT_BYTES} bytes")
        return {int(v): as_bytes(t) for v, t in reply.shares.items()}

    cap = max_wire_bytes(len(ids) * CIPHERTEXT_BYTES, len(ids))
    sent = roster_params(roster)
    got = yield Exchange("train", {c: ShareKeysRequest(r, sent) for c in ids}, ShareKeysReply, read_shares, cap)
    u2 = sorted(got.accepted)
    _enough(r, "shared their keys", u2, need)
    roster2 = roster_params({v: roster[v] for v in u2})

    def read_masked(c: int, reply: MaskedInputReply) -> tuple[torch.Tensor, int]:
        _same_round(r, reply.round)
        y = reply.masked
        wide = fp.modulus_bits > 32
        if y.dtype != (torch.int64 if wide else torch.int32) or y.shape != (n_values,):
            raise BadReply(f"secure aggregation: the masked input must be ({n_values},) {'int64' if wide else 'int32'}")
        if not 0 <= reply.clipped <= n_values:
            raise BadReply(f"secure aggregation: reports {reply.clipped} clipped values of {n_values}")
        y = y if wide else y.to(torch.int64) + 2**31
        if wide and (int(y.min()) < 0 or int(y.max()) >= fp.modulus):
            raise BadReply("secure aggregation: masked values outside the modulus")
        return y, reply.clipped

    def inbox(v: int) -> Params:
        return {str(u): torch.frombuffer(bytearray(got.accepted[u][v]), dtype=torch.uint8) for u in u2}

    width = 8 if fp.modulus_bits > 32 else 4
    cap = max_wire_bytes(n_values * width // 4, 1)
    masked = yield Exchange(
        "train", {v: MaskedInputRequest(r, roster2, inbox(v)) for v in u2}, MaskedInputReply, read_masked, cap
    )
    u3 = sorted(masked.accepted)
    _enough(r, "sent their masked update", u3, need)
    total = torch.zeros(n_values, dtype=torch.int64)
    for u in u3:
        total = fp.add(total, masked.accepted[u][0])
    gone = [v for v in u2 if v not in masked.accepted]

    def read_reveal(c: int, reply: UnmaskReply) -> dict[int, tuple[str, int]]:
        _same_round(r, reply.round)
        expected = {f"b/{v}" for v in u3} | {f"s/{v}" for v in gone}  # (less those whose ciphertext did not open)
        if not set(reply.shares) <= expected:
            raise BadReply("secure aggregation: shares revealed for the wrong clients")
        out = {}
        for name, t in reply.shares.items():
            if t.dtype != torch.uint8 or t.shape != (SHARE_BYTES,):
                raise BadReply(f"secure aggregation: a share must be {SHARE_BYTES} bytes")
            value = int.from_bytes(as_bytes(t), "big")
            if value >= PRIME:
                raise BadReply("secure aggregation: a share outside the field")
            kind, _, v = name.partition("/")
            out[int(v)] = (kind, value)
        return out

    request = UnmaskRequest(r, torch.tensor(u3, dtype=torch.int64), torch.tensor(gone, dtype=torch.int64))
    cap = max_wire_bytes(len(u2) * SHARE_BYTES, len(u2))
    revealed = yield Exchange("train", dict.fromkeys(u3, request), UnmaskReply, read_reveal, cap)
    _enough(r, "revealed shares", revealed.accepted, need)
    try:
        exact = unmask_sum(total, roster, u3, gone, revealed.accepted, need, r, fp)
    except SecAggError as exc:
        raise RunError(f"round {r}: secure aggregation could not unmask the sum: {exc}") from None
    clipped = sum(masked.accepted[u][1] for u in u3)  # values clipped to the fixed-point range: never silent
    metrics = {"secagg_summed": len(u3), "secagg_threshold": need, "secagg_clipped_values": clipped}
    return fp.decode(exact), u3, metrics


def _same_round(r: int, got: int) -> None:
    if got != r:
        raise BadReply(f"stale reply for round {got}")


def _enough(r: int, what: str, clients, need: int) -> None:
    if len(clients) < need:
        raise RunError(
            f"round {r}: only {len(clients)} clients {what}, fewer than secure aggregation's threshold {need} "
            "(privacy.secure_aggregation.threshold x the clients sampled): the round fails rather than reveal "
            "anything; the last checkpoint is intact. Rerun with --resume once enough clients are reachable"
        )
