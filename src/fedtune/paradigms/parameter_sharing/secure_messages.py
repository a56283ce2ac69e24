"""Secure aggregation's extra messages in a parameter-sharing round (``privacy.secure_aggregation``).

A secure round starts as any round, with ``TrainRequest``; its reply carries the client's two public
keys instead of an update (``TrainReply.secagg_keys``). Three exchanges follow (privacy/secagg.py):
share keys, masked input (asked again, with the senders a client named taken out, when one names
any), unmask. Byte strings (keys, ciphertexts, commitments, shares) travel as uint8 tensors named by
the client they concern; a roster names ``<client>/c`` and ``<client>/s`` public keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedtune.core.types import Params


@dataclass(frozen=True)
class ShareKeysRequest:
    """Server -> client: the round's roster of public keys; send each client its encrypted shares."""

    KIND: ClassVar[str] = "secagg_share_keys"
    TENSORS: ClassVar[tuple[str, ...]] = ("roster",)
    round: int
    roster: Params  # "<v>/c", "<v>/s" -> uint8 (32,)
    continues: bool = True  # goes on from the state this round's train request left (a deployed client's store)


@dataclass(frozen=True)
class ShareKeysReply:
    KIND: ClassVar[str] = "secagg_share_keys_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("shares", "commitments")
    round: int
    shares: Params  # "<v>" -> uint8 ciphertext of v's shares of this client's secrets
    commitments: Params  # "<v>/s", "<v>/b" -> uint8 (32,) SHA-256 of v's shares; "self" -> of the self-mask seed


@dataclass(frozen=True)
class MaskedInputRequest:
    """Server -> client: who is still in (the roster) and the ciphertexts addressed to this client."""

    KIND: ClassVar[str] = "secagg_masked_input"
    TENSORS: ClassVar[tuple[str, ...]] = ("roster", "inbox", "commitments")
    round: int
    roster: Params  # the clients whose shares arrived: "<v>/c", "<v>/s"
    inbox: Params  # "<u>" -> uint8 ciphertext from u to this client
    commitments: Params  # "<u>/s", "<u>/b" -> uint8 (32,): what u committed to for this client's shares
    continues: bool = True


@dataclass(frozen=True)
class MaskedInputReply:
    KIND: ClassVar[str] = "secagg_masked_input_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("masked", "accused")
    round: int
    masked: torch.Tensor  # (N,) the masked update mod 2^k: int32 (value − 2^31) for k <= 32, else int64; (0,): none
    clipped: int  # values of this client's update clipped to the fixed-point range
    accused: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # (A,) see below
    refused: str | None = None  # why it sends no masked input (it sent one in another instance of the round)
    # accused: the senders whose shares it could not open or check; it then sends no masked input


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> client: whose masked input arrived (survivors) and who left after sharing keys (dropped)."""

    KIND: ClassVar[str] = "secagg_unmask"
    TENSORS: ClassVar[tuple[str, ...]] = ("survivors", "dropped")
    round: int
    survivors: torch.Tensor  # (S,) int64 client ids
    dropped: torch.Tensor  # (D,) int64 client ids
    continues: bool = True


@dataclass(frozen=True)
class UnmaskReply:
    KIND: ClassVar[str] = "secagg_unmask_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("shares",)
    round: int
    shares: Params  # "b/<v>" (a survivor's self-mask seed share) or "s/<v>" (a dropped client's key share) -> uint8


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def as_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)


def roster_params(roster: dict[int, tuple[bytes, bytes]]) -> Params:
    out = {}
    for v, (c_pk, s_pk) in roster.items():
        out[f"{v}/c"], out[f"{v}/s"] = as_tensor(c_pk), as_tensor(s_pk)
    return out


def read_roster(params: Params) -> dict[int, tuple[bytes, bytes]]:
    """id -> (c_pk, s_pk) from a roster's tensors; ValueError unless every id has both 32-byte keys."""
    keys: dict[int, dict[str, bytes]] = {}
    for name, t in params.items():
        who, _, which = name.partition("/")
        if not who.isdigit() or which not in ("c", "s") or t.dtype != torch.uint8 or t.shape != (32,):
            raise ValueError(f"roster entry {name!r:.40} is not '<client>/c' or '<client>/s' with a 32-byte key")
        keys.setdefault(int(who), {})[which] = as_bytes(t)
    if any(len(k) != 2 for k in keys.values()):
        raise ValueError("a roster client lacks one of its two public keys")
    return {v: (k["c"], k["s"]) for v, k in sorted(keys.items())}


def read_commitments(params: Params, roster: dict[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
    """sender -> (commitment to the s share, to the b share) for every client of ``roster``; ValueError unless
    the tensors are exactly "<v>/s", "<v>/b" for each, 32 bytes each."""
    want = {f"{v}/{k}" for v in roster for k in ("s", "b")}
    if set(params) != want or any(t.dtype != torch.uint8 or t.shape != (32,) for t in params.values()):
        raise ValueError("the commitments must be a 32-byte '<client>/s' and '<client>/b' for each roster client")
    return {v: (as_bytes(params[f"{v}/s"]), as_bytes(params[f"{v}/b"])) for v in roster}


def read_ids(t: torch.Tensor, what: str) -> list[int]:
    if t.dtype != torch.int64 or t.dim() != 1 or (t.numel() and int(t.min()) < 0):
        raise ValueError(f"{what} must be a 1-D int64 tensor of client ids")
    ids = t.tolist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} names a client twice")
    return ids
