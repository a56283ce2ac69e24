import pytest

from fedtune.server.sampling import poisson_sample, sample_clients


def test_all_clients_when_per_round_covers_them():
    assert sample_clients(5, 5, seed=0, round_index=1) == [0, 1, 2, 3, 4]
    assert sample_clients(5, 9, seed=0, round_index=1) == [0, 1, 2, 3, 4]


def test_seeded_by_seed_and_round_only():
    a = [sample_clients(20, 4, seed=1, round_index=r) for r in range(1, 30)]
    b = [sample_clients(20, 4, seed=1, round_index=r) for r in range(1, 30)]
    assert a == b
    assert all(len(s) == 4 == len(set(s)) and s == sorted(s) for s in a)
    assert len({tuple(s) for s in a}) > 20  # rounds differ
    assert a != [sample_clients(20, 4, seed=2, round_index=r) for r in range(1, 30)]


def test_every_client_gets_picked_over_many_rounds():
    seen = {c for r in range(1, 200) for c in sample_clients(10, 2, seed=0, round_index=r)}
    assert seen == set(range(10))


def test_poisson_sampling_takes_each_client_with_its_rate_independently_and_replays():
    rounds = [poisson_sample(40, 0.25, seed=3, round_index=r) for r in range(1, 401)]
    assert rounds[0] == poisson_sample(40, 0.25, seed=3, round_index=1)  # (seed, round) alone decide
    sizes = [len(c) for c in rounds]
    assert abs(sum(sizes) / len(sizes) - 10) < 0.5 and len(set(sizes)) > 5  # mean q*N; the size varies
    counts = [sum(c in chosen for chosen in rounds) for c in range(40)]
    assert min(counts) > 60 and max(counts) < 140  # each client about q of the rounds (100 expected)
    assert all(chosen == sorted(set(chosen)) for chosen in rounds)
    assert poisson_sample(3, 0.01, seed=0, round_index=1) == []  # an empty round is possible
    assert poisson_sample(3, 1.0, seed=0, round_index=1) == [0, 1, 2]
    with pytest.raises(ValueError, match="rate"):
        poisson_sample(3, 0.0, seed=0, round_index=1)
