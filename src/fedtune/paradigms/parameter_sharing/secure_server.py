"""Secure aggregation, server side: the three exchanges after the train exchange, and the unmasked sum.

``secure_sum`` drives share keys -> masked input -> unmask (privacy/secagg.py) for the clients whose
public keys arrived with their train replies, and returns only Σ x_u over the clients whose masked
input arrived. The server never holds an individual update: it sees public keys, ciphertexts it
cannot open, commitments, masked vectors and shares of secrets of which it gets fewer than the
threshold for any one client's self-mask seed and mask key together.

A client that lies costs at most the round: unusable keys and malformed messages drop it; senders
whose shares a recipient cannot open or check are taken out before anyone masks with them; a
revealed share unlike its commitment drops its revealer. When the sum still cannot be had (fewer
clients than the threshold at any step, a dealer whose shares rebuild no secret) or is not one that
honest clipped clients can produce (a shifted masked input), the round's update is skipped, with
the reason in its metrics, and the run goes on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedtune.core.errors import untrusted_text
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
    read_ids,
    roster_params,
)
from fedtune.privacy.secagg import (
    CIPHERTEXT_BYTES,
    PRIME,
    SHARE_BYTES,
    FixedPoint,
    SecAggError,
    check_public_key,
    share_commitment,
    unmask_sum,
)
from fedtune.wire.link import max_wire_bytes

Roster = dict[int, tuple[bytes, bytes]]
log = logging.getLogger("fedtune")


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

    def clipped_to(self, limit: float | None) -> SecureAggregation:
        """These settings with clients clipping to ``limit`` too (the round's aggregation.max_update_norm): the
        server cannot check one update, so clients clip to it themselves and the sum is checked against it."""
        if limit is None or (self.clip_norm and self.clip_norm <= limit):
            return self
        return replace(self, clip_norm=limit)

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
    """A train reply's two public keys; BadReply unless both are usable 32-byte X25519 keys (uint8 tensors)."""
    if sorted(reply_keys) != ["c_pk", "s_pk"] or any(
        t.dtype != torch.uint8 or t.shape != (32,) for t in reply_keys.values()
    ):
        raise BadReply("secure aggregation: the reply must carry exactly its two 32-byte public keys")
    keys = as_bytes(reply_keys["c_pk"]), as_bytes(reply_keys["s_pk"])
    for key in keys:
        try:
            check_public_key(key)
        except SecAggError:
            raise BadReply(
                "secure aggregation: a public key of small order (it would make every secret zero)"
            ) from None
    return keys


class Skip(Exception):
    """The round's sum cannot be had without revealing or trusting too much: its update is skipped."""


def secure_sum(
    sec: SecureAggregation, r: int, roster: Roster, sampled: int, n_values: int
) -> Conversation[tuple[torch.Tensor | None, list[int], dict[str, Any]]]:
    """(Σ x_u as float32 (n_values,), the clients summed, metrics) for the clients of ``roster``; (None, [],
    metrics with ``secagg_skipped`` and why) when the round cannot give a sum it can trust."""
    excluded: dict[int, str] = {}  # clients taken out before masking, and why
    try:
        flat, summed, metrics = yield from _secure_sum(sec, r, roster, sampled, n_values, excluded)
    except Skip as exc:
        log.warning("round %d: secure aggregation skips the round's update: %s", r, exc)
        flat, summed, metrics = None, [], {"secagg_summed": 0, "secagg_skipped": 1, "secagg_skip_reason": str(exc)}
    if excluded:
        metrics["secagg_excluded"] = {str(v): why for v, why in sorted(excluded.items())}
    return flat, summed, metrics


def _secure_sum(
    sec: SecureAggregation, r: int, roster: Roster, sampled: int, n_values: int, excluded: dict[int, str]
) -> Conversation[tuple[torch.Tensor, list[int], dict[str, Any]]]:
    need = sec.needed(sampled)
    fp = sec.fixed_point
    _enough("sent usable public keys", roster, need)
    ids = sorted(roster)
    names = {f"{v}/{k}" for v in ids for k in ("s", "b")} | {"self"}

    def read_shares(c: int, reply: ShareKeysReply) -> tuple[dict[int, bytes], dict[str, bytes]]:
        _same_round(r, reply.round)
        if sorted(reply.shares) != sorted(str(v) for v in ids):
            raise BadReply("secure aggregation: shares must be addressed to exactly the clients of the roster")
        if any(t.dtype != torch.uint8 or t.shape != (CIPHERTEXT_BYTES,) for t in reply.shares.values()):
            raise BadReply(f"secure aggregation: every ciphertext must be {CIPHERTEXT_BYTES} bytes")
        if set(reply.commitments) != names or any(
            t.dtype != torch.uint8 or t.shape != (32,) for t in reply.commitments.values()
        ):
            raise BadReply("secure aggregation: commitments must be 32 bytes for each share dealt and the seed")
        return {int(v): as_bytes(t) for v, t in reply.shares.items()}, {
            k: as_bytes(t) for k, t in reply.commitments.items()
        }

    cap = max_wire_bytes(len(ids) * (CIPHERTEXT_BYTES + 64) + 32, 3 * len(ids) + 1)
    got = yield Exchange(
        "train", {c: ShareKeysRequest(r, roster_params(roster)) for c in ids}, ShareKeysReply, read_shares, cap
    )
    dealt = {u: got.accepted[u] for u in sorted(got.accepted)}  # dealer -> (ciphertexts, commitments)
    _enough("shared their keys", dealt, need)

    width = 8 if fp.modulus_bits > 32 else 4

    def read_masked(c: int, reply: MaskedInputReply) -> tuple[torch.Tensor, int] | list[int] | str:
        _same_round(r, reply.round)
        if reply.refused:  # a client's own rule (a repeated round), not a fault: it leaves the round's sum
            return untrusted_text(reply.refused)
        if reply.accused.numel():
            accused = read_ids(reply.accused, "accused")
            if not set(accused) <= set(asked) or reply.masked.numel():
                raise BadReply("secure aggregation: names clients outside the roster, or masks anyway")
            return accused
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

    # Masked input. A client names the senders whose shares it cannot open or check; they leave before anyone
    # masks with them, and the rest are asked again (the second ask's names were seen in the first: lies).
    asked = sorted(dealt)
    for attempt in (1, 2):
        u2 = roster_params({v: roster[v] for v in asked})
        requests = {v: _masked_request(r, u2, asked, dealt, v) for v in asked}
        cap = max_wire_bytes(n_values * width // 4 + len(asked) * 2, 2)
        masked = yield Exchange("train", requests, MaskedInputReply, read_masked, cap)
        for c in [c for c, a in masked.accepted.items() if isinstance(a, str)]:
            excluded[c] = f"refused to mask: {masked.accepted.pop(c)}"
        accusations = {c: a for c, a in masked.accepted.items() if isinstance(a, list)}
        if not accusations:
            break
        if attempt == 2:
            raise Skip("clients named senders a second time whose shares they had opened before: " + _who(accusations))
        for c, accused in accusations.items():
            for v in accused:
                excluded.setdefault(v, f"client {c} could not open or check the shares it dealt")
        left = [v for v in asked if v in masked.accepted and v not in excluded]
        log.warning("round %d: secure aggregation takes out %s: %s", r, sorted(excluded), _who(accusations))
        _enough("remain after the senders named were taken out", left, need)
        asked = left
    u3 = sorted(masked.accepted)
    _enough("sent their masked update", u3, need, excluded)
    total = torch.zeros(n_values, dtype=torch.int64)
    for u in u3:
        total = fp.add(total, masked.accepted[u][0])
    gone = [v for v in asked if v not in masked.accepted]

    def read_reveal(c: int, reply: UnmaskReply) -> dict[int, tuple[str, int]]:
        _same_round(r, reply.round)
        expected = {f"b/{v}" for v in u3} | {f"s/{v}" for v in gone}
        if not set(reply.shares) <= expected:
            raise BadReply("secure aggregation: shares revealed for the wrong clients")
        out = {}
        for name, t in reply.shares.items():
            if t.dtype != torch.uint8 or t.shape != (SHARE_BYTES,):
                raise BadReply(f"secure aggregation: a share must be {SHARE_BYTES} bytes")
            value = int.from_bytes(as_bytes(t), "big")
            kind, _, v = name.partition("/")
            if value >= PRIME or share_commitment(r, int(v), c, kind, value) != dealt[int(v)][1][f"{c}/{kind}"]:
                raise BadReply(f"secure aggregation: a share of client {v}'s secret unlike the one it was dealt")
            out[int(v)] = (kind, value)
        return out

    request = UnmaskRequest(r, torch.tensor(u3, dtype=torch.int64), torch.tensor(gone, dtype=torch.int64))
    cap = max_wire_bytes(len(asked) * SHARE_BYTES, len(asked))
    revealed = yield Exchange("train", dict.fromkeys(u3, request), UnmaskReply, read_reveal, cap)
    _enough("revealed shares", revealed.accepted, need)
    seeds = {u: dealt[u][1]["self"] for u in u3}
    try:
        exact = unmask_sum(total, roster, u3, gone, revealed.accepted, need, r, fp, seeds)
    except SecAggError as exc:
        raise Skip(f"the sum could not be unmasked: {exc}") from None
    _check_sum(sec, exact, len(u3), n_values)
    clipped = sum(masked.accepted[u][1] for u in u3)  # values clipped to the fixed-point range: never silent
    metrics = {"secagg_summed": len(u3), "secagg_threshold": need, "secagg_clipped_values": clipped}
    return fp.decode(exact), u3, metrics


def _masked_request(r: int, roster: Params, asked: list[int], dealt: dict, v: int) -> MaskedInputRequest:
    """Client v's masked-input request: the roster, what its senders dealt it, and their commitments to that."""
    inbox = {str(u): torch.frombuffer(bytearray(dealt[u][0][v]), dtype=torch.uint8) for u in asked}
    commitments = {
        f"{u}/{k}": torch.frombuffer(bytearray(dealt[u][1][f"{v}/{k}"]), dtype=torch.uint8)
        for u in asked
        for k in ("s", "b")
    }
    return MaskedInputRequest(r, roster, inbox, commitments)


def _check_sum(sec: SecureAggregation, exact: torch.Tensor, count: int, n_values: int) -> None:
    """Skip unless the unmasked sum (residues mod 2^k) is one that ``count`` honest clients can produce: every
    value within count x range, and with clipping its L2 norm within count x (clip norm + a bound on each
    client's noise share that fails with probability < 1e-9) plus the rounding."""
    fp = sec.fixed_point
    centred = fp.centred(exact)  # the sum x 2^bits, exact
    most = count * round(fp.range * 2**fp.bits)
    worst = int(centred.abs().max()) if centred.numel() else 0
    if worst > most:
        raise Skip(
            f"a value of the sum is {worst / 2**fp.bits:.6g}, more than {count} clients' values within "
            f"+-{fp.range:g} can add up to: a masked input was shifted"
        )
    if sec.clip_norm > 0:
        noise = (
            sec.noise_std / math.sqrt(sec.needed(count)) * (math.sqrt(n_values) + math.sqrt(2 * math.log(1e9 * count)))
        )
        bound = count * (sec.clip_norm + noise + 2.0 ** -(fp.bits + 1) * math.sqrt(n_values))
        norm = float(torch.linalg.vector_norm(centred.to(torch.float64))) / 2**fp.bits
        if norm > bound:
            raise Skip(
                f"the sum's norm {norm:.6g} is more than {count} clients clipped to {sec.clip_norm:g} give: {bound:.6g}"
            )


def _who(accusations: dict[int, list[int]]) -> str:
    return "; ".join(f"client {c} named {a}" for c, a in sorted(accusations.items()))


def _same_round(r: int, got: int) -> None:
    if got != r:
        raise BadReply(f"stale reply for round {got}")


def _enough(what: str, clients, need: int, excluded: dict[int, str] | None = None) -> None:
    if len(clients) < need:
        why = "".join(f"; client {c} {reason}" for c, reason in sorted((excluded or {}).items()))
        raise Skip(
            f"only {len(clients)} clients {what}, fewer than secure aggregation's threshold {need} "
            f"(privacy.secure_aggregation.threshold x the clients sampled): nothing is unmasked{why}"
        )
