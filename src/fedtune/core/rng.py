"""Every seeded random stream of a run, by name, and the one rule that keeps them apart.

A stream's draws come from a key: a list of integers that seeds numpy's ``SeedSequence`` (numpy draws
directly; torch draws from a generator seeded by the sequence's first 63 bits). Randomness is
therefore stateless: a round's draws are a pure function of (seed, round, client, index), so a
checkpoint needs no RNG state and a resumed run replays exactly.

The rule for the streams drawn during rounds: a key is ``[root, round, X, ...]``. ``X`` is a client
id (below ``TAGGED``) only in the three streams a client has always drawn from under these keys
(``CLIENT_ROUND``, ``UPLINK``, ``KD_DISTIL``); every other stream puts its own tag ``TAGGED + n``
there, or right after the client id, so no two streams drawn in one round share a key whatever the
client ids, micro-batch indices or seeds (``SeedSequence`` pads a key to four words with zeros and
splits integers into 32-bit words: keys are compared as it sees them; ``tests/core/test_rng.py``).
The streams drawn once, before round 1 (the data's held-out splits, from the data split seed), have
keys of their own shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

TAGGED = 1 << 31  # client ids, rounds and micro-batch indices stay below it (the config bounds them)


@dataclass(frozen=True)
class Stream:
    """One use of randomness: where its root seed comes from, and how its key is laid out."""

    name: str
    what: str  # what it draws, for the docs
    root: Literal["seed", "secret", "split_seed", "direction"]  # the run's seed, a noise seed, the data split's seed
    # or a zeroth-order direction's own seed
    layout: tuple[int | str, ...]  # after the root: "round", "client", "index" or a constant

    def key(
        self, root: int, round_index: int | None = None, client: int | None = None, index: int | None = None
    ) -> list[int]:
        """The key of this stream's draws (for ``round_index``, ``client``, ``index`` where it has them)."""
        parts = {"round": round_index, "client": client, "index": index}
        out = [root]
        for part in self.layout:
            if isinstance(part, str):
                value = parts[part]
                if value is None or not 0 <= value < TAGGED:
                    raise ValueError(f"stream {self.name}: {part} must be an integer in [0, 2^31), got {value!r}")
                out.append(value)
            else:
                out.append(part)
        return out


def _tag(n: int) -> int:
    return TAGGED + n


R, C, N = "round", "client", "index"  # key parts a stream draws per round, client, micro-batch index
CLIENT_ROUND = Stream("client_round", "a client's batch order and its round's torch seed (dropout)", "seed", (R, C))
UPLINK = Stream("uplink", "a client's uplink codec draws (stochastic rounding, random-k)", "seed", (R, C, 1))
KD_DISTIL = Stream("kd_distil", "a KD client's distillation batches", "seed", (R, C, 2))
SAMPLING = Stream("sampling", "the clients of a round (fixed-size sampling)", "seed", (R, _tag(1)))
POISSON = Stream("poisson", "the clients of a round (Poisson sampling)", "seed", (R, _tag(2)))
PUBLIC_SLICE = Stream("public_slice", "KD's public examples scored in a round", "seed", (R, _tag(3)))
SERVER_DISTIL = Stream("server_distil", "KD's server-side distillation batches", "seed", (R, _tag(4)))
DOWNLINK = Stream("downlink", "the server's downlink codec draws", "seed", (R, _tag(5)))
EVAL_DOWNLINK = Stream("eval_downlink", "the downlink codec draws of per-client evaluation", "seed", (R, _tag(6)))
SPLIT_FRONT = Stream("split_front", "a split client's activations at the first cut", "seed", (R, C, _tag(7), N))
SPLIT_MIDDLE = Stream("split_middle", "the split server's activations at the second cut", "seed", (R, C, _tag(8), N))
SPLIT_CUT_GRAD = Stream("split_cut_grad", "the split server's gradient at the first cut", "seed", (R, C, _tag(9), N))
SPLIT_BACK_GRAD = Stream("split_back_grad", "a split client's gradient at the second cut", "seed", (R, C, _tag(10), N))
DP_NOISE = Stream("dp_noise", "client-level DP's noise on the sum, adaptive clipping's count", "secret", (R, _tag(11)))
SECAGG_NOISE = Stream("secagg_noise", "a client's share of distributed DP's noise", "secret", (R, C, _tag(12)))
DP_SGD_NOISE = Stream("dp_sgd_noise", "a client's DP-SGD noise", "secret", (R, C, _tag(13)))
EDGE_UPLINK = Stream("edge_uplink", "an edge aggregator's uplink codec draws", "seed", (R, _tag(16), N))
ZO_DIRECTION = Stream("zo_direction", "a zeroth-order direction z, tensor by tensor", "direction", (N, _tag(14)))
# drawn once, before round 1, from the data split's seed (data.split_seed, default the run's seed)
HELD_OUT = Stream("held_out", "the examples held out for evaluation from one dataset", "split_seed", (0xE7A1,))
CLIENT_HOLDOUT = Stream("client_holdout", "a client's held-out share", "split_seed", (C, 0x401D))
# drawn by fedtune tune, outside any run (its tag where a round stream has its round: no round stream's key)
TUNE_TRIAL = Stream("tune_trial", "the seed of a search's sampler for trial N (fedtune tune)", "seed", (_tag(15), N))

STREAMS: tuple[Stream, ...] = (
    CLIENT_ROUND,
    UPLINK,
    KD_DISTIL,
    SAMPLING,
    POISSON,
    PUBLIC_SLICE,
    SERVER_DISTIL,
    DOWNLINK,
    EVAL_DOWNLINK,
    SPLIT_FRONT,
    SPLIT_MIDDLE,
    SPLIT_CUT_GRAD,
    SPLIT_BACK_GRAD,
    DP_NOISE,
    SECAGG_NOISE,
    DP_SGD_NOISE,
    EDGE_UPLINK,
    ZO_DIRECTION,
)
SETUP_STREAMS: tuple[Stream, ...] = (HELD_OUT, CLIENT_HOLDOUT, TUNE_TRIAL)


def numpy_rng(
    stream: Stream, root: int, round_index: int | None = None, client: int | None = None, index: int | None = None
) -> np.random.Generator:
    """numpy's generator for one stream's draws in a round."""
    return np.random.default_rng(stream.key(root, round_index, client, index))


def torch_generator(
    stream: Stream, root: int, round_index: int | None = None, client: int | None = None, index: int | None = None
) -> torch.Generator:
    """A torch generator for one stream's draws in a round (seeded by the stream's key)."""
    return generator_of(stream.key(root, round_index, client, index))


def generator_of(key: list[int]) -> torch.Generator:
    """A torch generator seeded by a key (a list of non-negative integers): reproducible draws."""
    seed = int(np.random.default_rng(key).integers(2**63 - 1))
    return torch.Generator().manual_seed(seed)
