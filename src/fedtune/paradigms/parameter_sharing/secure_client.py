"""Secure aggregation, client side: turn the update into a masked vector and take part in the unmasking.

The client's round secrets (its X25519 keys, self-mask seed, encoded update, the ciphertexts it
received) live in its state under the owner ``secagg`` from the train request to the unmask request,
and are deleted after it; only the seed of its DP noise share stays (drawn from the OS the first time).

A client sends a masked input in at most one secure instance of a round: two sums of one round over
different clients would give the server their difference, one client's update. Its record of the
rounds it sent in (round, instance) is durable client state (``core.types.DURABLE``), which a
deployed client keeps outside the per-round states a repeated round starts from.
"""

from __future__ import annotations

import math
import secrets

import torch

from fedtune.core import rng
from fedtune.core.types import DURABLE, ClientState, Params
from fedtune.paradigms.parameter_sharing.secure_messages import (
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
    as_bytes,
    as_tensor,
    read_commitments,
    read_ids,
    read_roster,
)
from fedtune.privacy.secagg import ClientRound, FixedPoint

OWNER = "secagg"
SPEC_KEYS = ("threshold", "range", "bits", "modulus_bits", "clip_norm", "noise_std", "noise_seed")


def flat_update(delta: Params) -> torch.Tensor:
    """(N,) float32: the update's tensors in name order, one after another."""
    return torch.cat([delta[k].detach().to(torch.float32).reshape(-1) for k in sorted(delta)])


def prepare(
    delta: Params, spec: dict[str, float], client: int, r: int, state: ClientState
) -> tuple[Params, ClientState]:
    """After training: clip, add this client's noise share, encode, make the round's keys. (public keys, state)"""
    if sorted(spec) != sorted(SPEC_KEYS):
        raise ValueError(f"secure aggregation settings must name {SPEC_KEYS}, got {sorted(spec)}")
    t = int(spec["threshold"])
    fp = FixedPoint(float(spec["range"]), int(spec["bits"]), int(spec["modulus_bits"]))
    x = flat_update(delta)  # (N,)
    if spec["clip_norm"] > 0:
        norm = float(torch.linalg.vector_norm(x))
        if norm > spec["clip_norm"]:
            x = x * (spec["clip_norm"] / norm)
    own = dict(state.get(OWNER, {}))
    if spec["noise_std"] > 0:  # a share of the sum's noise: t or more shares make at least the full variance
        seed = own.get("noise_seed")
        if spec["noise_seed"] >= 0:  # privacy.noise_seed, set for experiments: every client's noise repeats
            seed = torch.tensor([int(spec["noise_seed"])], dtype=torch.int64)
        elif seed is None:
            seed = torch.tensor([secrets.randbits(63)], dtype=torch.int64)
        own["noise_seed"] = seed
        g = rng.torch_generator(rng.SECAGG_NOISE, int(seed[0]), r, client)
        x = x + (spec["noise_std"] / math.sqrt(t)) * torch.randn(x.shape, generator=g)
    encoded, clipped = fp.encode(x)
    keys = ClientRound.fresh(client, r)
    own.update(
        secrets=as_tensor(keys.to_bytes()),
        x=encoded,
        clipped=torch.tensor([clipped]),
        spec=torch.tensor([t, fp.bits, fp.modulus_bits, r], dtype=torch.int64),
        range=torch.tensor([fp.range], dtype=torch.float64),
    )
    c_pk, s_pk = keys.public_keys()
    return {"c_pk": as_tensor(c_pk), "s_pk": as_tensor(s_pk)}, {**state, OWNER: own}


def _round(state: ClientState, r: int) -> tuple[dict, ClientRound, FixedPoint, int]:
    own = state.get(OWNER, {})
    if "secrets" not in own or int(own["spec"][3]) != r:
        raise ValueError(f"no secure-aggregation round {r} in progress on this client")
    t, bits, k, _ = (int(v) for v in own["spec"])
    return dict(own), ClientRound.from_bytes(as_bytes(own["secrets"])), FixedPoint(float(own["range"][0]), bits, k), t


def share_keys(req: ShareKeysRequest, state: ClientState) -> tuple[ShareKeysReply, ClientState]:
    _, keys, _, t = _round(state, req.round)
    roster = read_roster(req.roster)
    if len(roster) < t:
        raise ValueError(f"the roster holds {len(roster)} clients, fewer than the threshold {t}")
    if roster.get(keys.client) != keys.public_keys():
        raise ValueError("the roster does not hold this client's own public keys")
    sealed, commitments = keys.share_keys(roster, t)
    shares = {str(v): as_tensor(ct) for v, ct in sealed.items()}
    return ShareKeysReply(req.round, shares, {k: as_tensor(h) for k, h in commitments.items()}), state


def masked_input(req: MaskedInputRequest, state: ClientState) -> tuple[MaskedInputReply, ClientState]:
    own, keys, fp, t = _round(state, req.round)
    roster = read_roster(req.roster)
    if len(roster) < t or keys.client not in roster:
        raise ValueError(
            f"the roster holds {len(roster)} clients (threshold {t}), this one included: {keys.client in roster}"
        )
    if sorted(req.inbox) != sorted(str(v) for v in roster):
        raise ValueError("the inbox must hold one ciphertext from every client of the roster")
    received = {int(k): as_bytes(v) for k, v in req.inbox.items()}
    _, accused = keys.open_inbox(received, roster, read_commitments(req.commitments, roster))
    if accused:  # masking with them would need their shares to undo: name them, mask nothing yet
        named = torch.tensor(accused, dtype=torch.int64)
        return MaskedInputReply(req.round, torch.zeros(0, dtype=torch.int64), 0, named), state
    try:
        state = _record_sent(state, req.round, keys)
    except ValueError as exc:
        return MaskedInputReply(req.round, torch.zeros(0, dtype=torch.int64), 0, refused=str(exc)), state
    y = keys.masked_input(own["x"], roster, fp)  # (N,) residues mod 2^k
    wire = (y - 2**31).to(torch.int32) if fp.modulus_bits <= 32 else y
    own = {k: v for k, v in own.items() if not k.startswith(("inbox:", "roster:"))}  # an earlier ask's go
    own.update({f"inbox:{k}": v.clone() for k, v in req.inbox.items()})  # (the state holds flat named tensors)
    own.update({f"roster:{k}": v.clone() for k, v in req.roster.items()})
    return MaskedInputReply(req.round, wire, int(own["clipped"][0])), {**state, OWNER: own}


def _record_sent(state: ClientState, r: int, keys: ClientRound) -> ClientState:
    """The state with round ``r`` recorded as sent in this instance (its keys); ValueError if this client sent
    a masked input in another instance of round ``r`` (a coordinator that repeats a secure round)."""
    instance = int.from_bytes(keys.public_keys()[1][:8], "big") >> 1  # (fits int64)
    durable = dict(state.get(DURABLE, {}))
    sent = durable.get("secagg_sent", torch.zeros(0, 2, dtype=torch.int64))  # (K, 2): (round, instance)
    earlier = sent[sent[:, 0] == r]
    if len(earlier) and int(earlier[0, 1]) != instance:
        raise ValueError(
            f"this client already sent a masked input in round {r} of this run: a second sum of the round "
            "could give away its update, so it takes no part in this one"
        )
    if not len(earlier):
        durable["secagg_sent"] = torch.cat([sent, torch.tensor([[r, instance]], dtype=torch.int64)])
    return {**state, DURABLE: durable}


def unmask(req: UnmaskRequest, state: ClientState) -> tuple[UnmaskReply, ClientState]:
    """Reveal the shares the server needs; refuse when fewer than the threshold survived (the 'sum' of too few
    clients would be an individual update)."""
    own, keys, _, t = _round(state, req.round)
    inbox = {k.partition(":")[2]: v for k, v in own.items() if k.startswith("inbox:")}
    if not inbox:
        raise ValueError("unmask before masked input")
    survivors, dropped = read_ids(req.survivors, "survivors"), read_ids(req.dropped, "dropped")
    if len(survivors) < t:
        raise ValueError(f"only {len(survivors)} survivors, fewer than the threshold {t}: nothing is revealed")
    roster = read_roster({k.partition(":")[2]: v for k, v in own.items() if k.startswith("roster:")})
    if not set(survivors) | set(dropped) <= set(roster):
        raise ValueError("survivors and dropped must be clients of the roster")
    received = {int(k): as_bytes(v) for k, v in inbox.items()}
    revealed = keys.unmask(received, roster, survivors, dropped)
    shares = {f"{kind}/{v}": as_tensor(value.to_bytes(66, "big")) for v, (kind, value) in revealed.items()}
    rest = {k: v for k, v in own.items() if k == "noise_seed"}  # the round's secrets end here
    return UnmaskReply(req.round, shares), {**state, OWNER: rest}
