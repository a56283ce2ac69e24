"""The named random streams: no two drawn in one round share a key, whatever the seeds and ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedtune.core import rng

CLIENTS = [*range(40), 1443, 36885, 39708, 2**31 - 1]  # ids that equal an earlier layout's magic tags, the largest
INDICES = [*range(40), 10**6, 2**31 - 1]  # micro-batches
ROUNDS = [1, 2, 217, 2**31 - 1]  # 217 = 0xD9, the DP noise's earlier tag
ROOTS = [(0, 0), (0, 1), (7, 7), (5, 2**40 + 3), (2**40 + 3, 5), (1, 2**63 - 1)]  # (seed, noise seed)


def _state(key: list[int]) -> tuple[int, ...]:
    """What the key seeds, as numpy sees it (a key padded with zeros, or split into words, is the same key)."""
    return tuple(np.random.SeedSequence(key).generate_state(4).tolist())


def _keys(stream: rng.Stream, seed: int, noise_seed: int, r: int):
    root = noise_seed if stream.root == "secret" else seed
    clients = CLIENTS if "client" in stream.layout else [None]
    indices = INDICES if "index" in stream.layout else [None]
    for c, i in itertools.product(clients, indices):
        yield (stream.name, c, i), stream.key(root, r, c, i)


@pytest.mark.parametrize(("seed", "noise_seed"), ROOTS)
@pytest.mark.parametrize("r", ROUNDS)
def test_no_two_streams_drawn_in_one_round_share_a_key(seed, noise_seed, r):
    seen: dict[tuple[int, ...], tuple] = {}
    for stream in rng.STREAMS:
        for what, key in _keys(stream, seed, noise_seed, r):
            state = _state(key)
            assert state not in seen, f"{what} draws what {seen[state]} draws (key {key})"
            seen[state] = what
    assert len(seen) > 7_000  # every stream, client and micro-batch of the round was counted


def test_the_streams_runs_have_always_drawn_keep_their_keys():
    """A client's batch order, its uplink codec and KD distillation, and the data's held-out splits: the
    examples' results depend on these, so they keep the keys earlier versions drew them with."""
    assert rng.CLIENT_ROUND.key(3, 5, 2) == [3, 5, 2]
    assert rng.UPLINK.key(3, 5, 2) == [3, 5, 2, 1]
    assert rng.KD_DISTIL.key(3, 5, 2) == [3, 5, 2, 2]
    assert rng.HELD_OUT.key(3) == [3, 0xE7A1]
    assert rng.CLIENT_HOLDOUT.key(3, client=2) == [3, 2, 0x401D]


def test_a_key_part_out_of_range_or_missing_is_refused():
    with pytest.raises(ValueError, match="client must be an integer"):
        rng.UPLINK.key(0, 1, 2**31)
    with pytest.raises(ValueError, match="index must be an integer"):
        rng.SPLIT_FRONT.key(0, 1, 0, -1)
    with pytest.raises(ValueError, match="round must be an integer"):
        rng.SAMPLING.key(0)


def test_generators_replay_their_draws_and_streams_differ():
    a = rng.torch_generator(rng.DOWNLINK, 0, 1)
    b = rng.torch_generator(rng.DOWNLINK, 0, 1)
    c = rng.torch_generator(rng.EVAL_DOWNLINK, 0, 1)
    import torch

    x, y, z = (torch.rand(8, generator=g) for g in (a, b, c))
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert rng.numpy_rng(rng.SAMPLING, 0, 1).random() == rng.numpy_rng(rng.SAMPLING, 0, 1).random()


def test_every_stream_has_a_distinct_name_and_a_description():
    names = [s.name for s in (*rng.STREAMS, *rng.SETUP_STREAMS)]
    assert len(names) == len(set(names)) and all(s.what for s in (*rng.STREAMS, *rng.SETUP_STREAMS))
