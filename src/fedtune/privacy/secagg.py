"""Secure aggregation (Bonawitz et al. 2017): the server learns the sum of the clients' vectors, nothing else.

The protocol of one round, for the clients U that were sampled (semi-honest server, clients that may
lie; ``docs/privacy.md``, ``docs/security.md``):

0. **Advertise keys.** Each client u makes two fresh X25519 key pairs: (c_sk, c_pk) to encrypt what it
   sends other clients through the server, (s_sk, s_pk) to agree pairwise masks. Server: U1 replied
   with keys that are usable (``check_public_key``: not of small order).
1. **Share keys.** u draws a self-mask seed b_u, splits s_sk_u and b_u into Shamir shares with threshold
   t (one per v in U1), and sends each v its two shares encrypted with ChaCha20-Poly1305 under a key
   from X25519(c_sk_u, c_pk_v). Beside them, in the clear, it commits to each share and to b_u
   (SHA-256, ``share_commitment``, ``seed_commitment``). Server: U2 replied; it forwards each v the
   ciphertexts addressed to v and u's commitments to v's shares.
2. **Masked input.** v opens what it received first (``ClientRound.open_inbox``): a ciphertext that
   does not open, or whose shares differ from their commitments, names its sender, and v answers with
   the names instead of a masked input; the server takes the named senders out and asks again. Else
   u sends y_u = x_u + PRG(b_u) + Σ_{v ∈ U2, v ≠ u} ±PRG(s_uv)  (mod 2^k), where
   s_uv = X25519(s_sk_u, s_pk_v), + when u < v, − when u > v. Server: U3 replied; Σ y_u over U3 holds
   every pair mask between two clients of U3 twice with opposite signs.
3. **Unmask.** The server names U3 and the dropped U2 \\ U3; each u returns its share of b_v for every
   v in U3 and of s_sk_v for every dropped v, never both for one v. The server keeps only shares that
   match their commitments (a revealer that lies is found and dropped), rebuilds each secret from t
   of them and checks it (b_v against its commitment, s_sk_v against s_pk_v), then removes the
   self-masks and the dropped clients' pair masks: Σ_{u ∈ U3} x_u.

Fewer than t clients at any step, or a secret that does not rebuild, and nothing is reconstructed:
the server skips the round's update. Masks are ChaCha20
keystreams under keys from HKDF-SHA256; seeds and keys are 256-bit; the field of the shares is the
Mersenne prime 2^521 − 1. Values are integers mod 2^k (``FixedPoint`` maps floats there and back).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # the Shamir field: larger than any 256-bit secret
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SecAggError(ValueError):
    """What a party sent cannot be used (a bad key, share or ciphertext), or too few are left."""


# ---------------------------------------------------------------- fixed point


@dataclass(frozen=True)
class FixedPoint:
    """Floats in [-range, range] as integers mod 2^modulus_bits, ``bits`` fractional bits.

    A value v becomes round(clip(v) · 2^bits) mod 2^k; a sum of ``clients`` of them decodes exactly as
    long as 2·clients·range·2^bits < 2^k, which ``fit`` guarantees. Encoding reports how many values
    were clipped to the range, so clipping is never silent.
    """

    range: float
    bits: int
    modulus_bits: int

    @classmethod
    def fit(cls, value_range: float, bits: int, clients: int) -> FixedPoint:
        """The smallest modulus (32 bits, else up to 62) that holds a sum of ``clients`` values."""
        if not value_range > 0 or bits < 0 or clients < 1:
            raise ValueError(f"need range > 0, bits >= 0, clients >= 1; got {value_range}, {bits}, {clients}")
        need = 2 * clients * value_range * 2**bits + 2  # every sum in [-n·R·2^f, n·R·2^f], and its negation
        k = 32 if need < 2**32 else int(np.ceil(np.log2(need)))
        if k > 62:
            raise ValueError(
                f"{clients} clients x range {value_range} at {bits} fractional bits need a {k}-bit modulus; "
                "at most 62 fit the arithmetic: lower the precision or the range"
            )
        return cls(value_range, bits, k)

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(int64 residues mod 2^k (same shape), how many values were clipped to the range)."""
        v = values.detach().to(torch.float64)
        clipped = int((v.abs() > self.range).sum()) + int((~torch.isfinite(v)).sum())
        v = torch.nan_to_num(v, nan=0.0).clamp(-self.range, self.range)
        q = torch.round(v * 2.0**self.bits).to(torch.int64)
        return torch.remainder(q, self.modulus), clipped

    def centred(self, residues: torch.Tensor) -> torch.Tensor:
        """Residues of a sum as int64 in [-2^(k-1), 2^(k-1)): the sum x 2^bits, exact."""
        r = torch.remainder(residues, self.modulus)
        return torch.where(r >= self.modulus // 2, r - self.modulus, r)

    def decode(self, residues: torch.Tensor) -> torch.Tensor:
        """Residues of a sum back to float32: the centred representative over 2^bits."""
        return (self.centred(residues).to(torch.float64) / 2.0**self.bits).to(torch.float32)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.remainder(a + b, self.modulus)

    def sub(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.remainder(a - b, self.modulus)


# ---------------------------------------------------------------- primitives


def prg(seed: bytes, n: int, modulus_bits: int) -> torch.Tensor:
    """n pseudo-random residues mod 2^modulus_bits (int64), the ChaCha20 keystream of a 32-byte seed."""
    width = 4 if modulus_bits <= 32 else 8
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor().update(b"\0" * (width * n))
    words = np.frombuffer(stream, dtype=np.uint32 if width == 4 else np.uint64)
    if width == 8:
        words = words & np.uint64((1 << modulus_bits) - 1)
        return torch.from_numpy(words.astype(np.int64))
    out = torch.from_numpy(words.astype(np.int64))
    return out if modulus_bits == 32 else out & ((1 << modulus_bits) - 1)


def derive(secret: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose from a key-agreement secret (HKDF-SHA256)."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"fedtune secagg " + purpose).derive(secret)


def check_public_key(public: bytes) -> None:
    """SecAggError unless ``public`` is a 32-byte X25519 key that agrees a usable secret (not of small order:
    those make every shared secret zero, for whoever holds the other key)."""
    if len(public) != 32:
        raise SecAggError(f"a public key must be 32 bytes, not {len(public)}")
    agree(X25519PrivateKey.generate(), public)


def share_commitment(r: int, dealer: int, recipient: int, kind: str, share: int) -> bytes:
    """SHA-256 of one share as its dealer handed it out (a share of t >= 2 is uniform in the field: its
    hash tells nothing of the secret)."""
    head = struct.pack("<qqq", r, dealer, recipient) + kind.encode()
    return _hash(b"fedtune secagg share", head + share.to_bytes(SHARE_BYTES, "big"))


def seed_commitment(r: int, client: int, b_seed: bytes) -> bytes:
    """SHA-256 of a client's self-mask seed (256 random bits), to check the seed the server rebuilds."""
    return _hash(b"fedtune secagg seed", struct.pack("<qq", r, client) + b_seed)


def _hash(purpose: bytes, data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(purpose + b"\0" + data)
    return h.finalize()


def agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise SecAggError(f"not a usable X25519 public key: {exc}") from None


def shamir_split(secret: int, xs: Iterable[int], threshold: int) -> dict[int, int]:
    """Shares y = f(x) of a random polynomial of degree threshold-1 with f(0) = secret, at each x (> 0)."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must lie in the field")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"share points must be in 1..p-1, got {x}")
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def shamir_join(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from at least ``threshold`` shares (Lagrange interpolation); the first ``threshold`` are used."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret shared with threshold {threshold}")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


def point(client: int) -> int:
    """A client's Shamir evaluation point (never 0, where the secret lives)."""
    return client + 1


# ---------------------------------------------------------------- one client's round


@dataclass
class ClientRound:
    """A client's secrets for one round. ``to_bytes``/``from_bytes`` keep them in its state between exchanges."""

    client: int
    round: int
    c_sk: X25519PrivateKey
    s_sk: X25519PrivateKey
    b_seed: bytes  # the self-mask seed, 32 bytes

    @classmethod
    def fresh(cls, client: int, r: int) -> ClientRound:
        return cls(client, r, X25519PrivateKey.generate(), X25519PrivateKey.generate(), secrets.token_bytes(32))

    def public_keys(self) -> tuple[bytes, bytes]:
        return self.c_sk.public_key().public_bytes(*_RAW), self.s_sk.public_key().public_bytes(*_RAW)

    def to_bytes(self) -> bytes:
        keys = self.c_sk.private_bytes(*_private_raw()) + self.s_sk.private_bytes(*_private_raw())
        return struct.pack("<qq", self.client, self.round) + keys + self.b_seed

    @classmethod
    def from_bytes(cls, blob: bytes) -> ClientRound:
        client, r = struct.unpack("<qq", blob[:16])
        c, s, b = blob[16:48], blob[48:80], blob[80:112]
        return cls(client, r, X25519PrivateKey.from_private_bytes(c), X25519PrivateKey.from_private_bytes(s), b)

    def share_keys(
        self, roster: Mapping[int, tuple[bytes, bytes]], threshold: int
    ) -> tuple[dict[int, bytes], dict[str, bytes]]:
        """Step 1: (for each v in the roster (id -> (c_pk, s_pk)) the ciphertext of v's shares of s_sk and b,
        the commitments: "<v>/s", "<v>/b" to v's shares, "self" to b)."""
        if self.client not in roster:
            raise SecAggError(f"client {self.client} is not in the roster it was sent")
        xs = [point(v) for v in roster]
        s_int = int.from_bytes(self.s_sk.private_bytes(*_private_raw()), "big")
        s_shares = shamir_split(s_int, xs, threshold)
        b_shares = shamir_split(int.from_bytes(self.b_seed, "big"), xs, threshold)
        out, commitments = {}, {"self": seed_commitment(self.round, self.client, self.b_seed)}
        for v, (c_pk, _) in roster.items():
            s_v, b_v = s_shares[point(v)], b_shares[point(v)]
            out[v] = _seal(agree(self.c_sk, c_pk), self.client, v, self.round, _pack_shares(self.client, v, s_v, b_v))
            commitments[f"{v}/s"] = share_commitment(self.round, self.client, v, "s", s_v)
            commitments[f"{v}/b"] = share_commitment(self.round, self.client, v, "b", b_v)
        return out, commitments

    def open_inbox(
        self,
        received: Mapping[int, bytes],
        roster: Mapping[int, tuple[bytes, bytes]],
        commitments: Mapping[int, tuple[bytes, bytes]],
    ) -> tuple[dict[int, tuple[int, int]], list[int]]:
        """Step 2's check, before masking: (sender -> (s share, b share) for what opened and matches the
        sender's commitments (s, b), the senders whose ciphertext does not open, holds shares for another
        pair, or differs from what they committed to)."""
        opened, bad = {}, []
        for v in sorted(roster):
            shares = self._shares_from(v, received.get(v), roster)
            if shares is None or commitments.get(v) != (
                share_commitment(self.round, v, self.client, "s", shares[0]),
                share_commitment(self.round, v, self.client, "b", shares[1]),
            ):
                bad.append(v)
                continue
            opened[v] = shares
        return opened, bad

    def _shares_from(
        self, v: int, blob: bytes | None, roster: Mapping[int, tuple[bytes, bytes]]
    ) -> tuple[int, int] | None:
        """(s share, b share) that client v sealed for this client in ``blob``; None if it does not open or holds
        the shares of another pair (forged, altered or misdirected, by its sender or on the way)."""
        if blob is None:
            return None
        try:
            sender, to, s_share, b_share = _unpack_shares(
                _open(agree(self.c_sk, roster[v][0]), v, self.client, self.round, blob)
            )
        except SecAggError:
            return None
        return (s_share, b_share) if (sender, to) == (v, self.client) else None

    def masked_input(self, x: torch.Tensor, roster: Mapping[int, tuple[bytes, bytes]], fp: FixedPoint) -> torch.Tensor:
        """Step 2: y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^k over the others of the roster (step 1's repliers)."""
        n = x.numel()
        y = fp.add(x.reshape(-1), prg(derive(self.b_seed, b"self"), n, fp.modulus_bits))
        for v, (_, s_pk) in sorted(roster.items()):
            if v == self.client:
                continue
            mask = prg(_pair_seed(agree(self.s_sk, s_pk), self.client, v, self.round), n, fp.modulus_bits)
            y = fp.add(y, mask) if self.client < v else fp.sub(y, mask)
        return y.reshape(x.shape)

    def unmask(
        self,
        received: Mapping[int, bytes],
        roster: Mapping[int, tuple[bytes, bytes]],
        survivors: Iterable[int],
        dropped: Iterable[int],
    ) -> dict[int, tuple[str, int]]:
        """Step 3: for each survivor v its share of b_v, for each dropped v its share of s_sk_v (v -> (kind, share)).

        A ciphertext that does not open, or holds shares for another pair, was forged or altered by its sender
        or on the way: its share is left out (the other clients' shares can still reach the threshold)."""
        survivors, dropped = set(survivors), set(dropped)
        if survivors & dropped:
            raise SecAggError("the server named a client both as surviving and as dropped")
        out: dict[int, tuple[str, int]] = {}
        for v in sorted(survivors | dropped):
            if v not in received or v not in roster:
                raise SecAggError(f"no shares from client {v} to reveal")
            shares = self._shares_from(v, received[v], roster)
            if shares is not None:
                out[v] = ("b", shares[1]) if v in survivors else ("s", shares[0])
        return out


def unmask_sum(
    masked_sum: torch.Tensor,
    roster: Mapping[int, tuple[bytes, bytes]],
    survivors: Iterable[int],
    dropped: Iterable[int],
    revealed: Mapping[int, Mapping[int, tuple[str, int]]],
    threshold: int,
    r: int,
    fp: FixedPoint,
    seed_commitments: Mapping[int, bytes],
) -> torch.Tensor:
    """The server's step 3: Σ_{u ∈ survivors} x_u mod 2^k from Σ y_u and the shares ``revealed`` by each replier
    (each already checked against its commitment). Every rebuilt secret is checked: a self-mask seed against
    ``seed_commitments`` (client -> ``seed_commitment``), a mask key against the client's public key; one that
    does not match (its dealer handed out shares of no one polynomial) is a SecAggError naming the dealer."""
    survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
    if len(revealed) < threshold:
        raise SecAggError(f"{len(revealed)} clients revealed shares; the threshold is {threshold}")
    n = masked_sum.numel()
    total = masked_sum.reshape(-1)
    for u in survivors:
        seed = _secret(shamir_join(_collect(revealed, u, "b"), threshold), f"client {u}'s self-mask seed")
        if seed_commitment(r, u, seed) != seed_commitments.get(u):
            raise SecAggError(f"client {u}'s self-mask seed did not rebuild: it dealt inconsistent shares")
        total = fp.sub(total, prg(derive(seed, b"self"), n, fp.modulus_bits))
    for v in dropped:
        key = _secret(shamir_join(_collect(revealed, v, "s"), threshold), f"client {v}'s mask key")
        s_sk = X25519PrivateKey.from_private_bytes(key)
        if s_sk.public_key().public_bytes(*_RAW) != roster[v][1]:
            raise SecAggError(f"client {v}'s mask key did not rebuild: it dealt inconsistent shares")
        for u in survivors:  # u added +PRG(s_uv) when u < v, −PRG when u > v: take it back out
            mask = prg(_pair_seed(agree(s_sk, roster[u][1]), u, v, r), n, fp.modulus_bits)
            total = fp.sub(total, mask) if u < v else fp.add(total, mask)
    return total.reshape(masked_sum.shape)


def _collect(revealed: Mapping[int, Mapping[int, tuple[str, int]]], v: int, kind: str) -> dict[int, int]:
    out = {}
    for sender, shares in revealed.items():
        if v in shares:
            got, value = shares[v]
            if got != kind:
                raise SecAggError(f"client {sender} revealed the wrong kind of share for client {v}")
            out[point(sender)] = value
    return out


def _secret(value: int, what: str) -> bytes:
    if value >= 2**256:
        raise SecAggError(f"{what} did not reconstruct: the shares revealed are inconsistent")
    return value.to_bytes(32, "big")


def _private_raw():
    return serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()


def _pair_seed(secret: bytes, u: int, v: int, r: int) -> bytes:
    """The seed of the pair mask of u and v in round r: the same from either side."""
    a, b = min(u, v), max(u, v)
    return derive(secret, b"pair %d %d %d" % (a, b, r))


def _seal(secret: bytes, sender: int, to: int, r: int, plain: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + ChaCha20Poly1305(derive(secret, b"shares")).encrypt(nonce, plain, _aad(sender, to, r))


def _open(secret: bytes, sender: int, to: int, r: int, blob: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return ChaCha20Poly1305(derive(secret, b"shares")).decrypt(blob[:12], blob[12:], _aad(sender, to, r))
    except (InvalidTag, ValueError):
        raise SecAggError(
            f"the ciphertext from client {sender} does not open: forged, altered or misdirected"
        ) from None


def _aad(sender: int, to: int, r: int) -> bytes:
    return struct.pack("<qqq", sender, to, r)


SHARE_BYTES = 66  # a field element of 2^521 − 1 fits 66 bytes
CIPHERTEXT_BYTES = 12 + (16 + 2 * SHARE_BYTES) + 16  # nonce, (sender, recipient, two shares), Poly1305 tag


def _pack_shares(sender: int, to: int, s_share: int, b_share: int) -> bytes:
    return struct.pack("<qq", sender, to) + s_share.to_bytes(SHARE_BYTES, "big") + b_share.to_bytes(SHARE_BYTES, "big")


def _unpack_shares(plain: bytes) -> tuple[int, int, int, int]:
    if len(plain) != 16 + 2 * SHARE_BYTES:
        raise SecAggError("a share message has the wrong length")
    sender, to = struct.unpack("<qq", plain[:16])
    s = int.from_bytes(plain[16 : 16 + SHARE_BYTES], "big")
    b = int.from_bytes(plain[16 + SHARE_BYTES :], "big")
    return sender, to, s, b
