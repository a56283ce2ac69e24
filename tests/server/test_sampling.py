from fedtune.server.sampling import sample_clients


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
