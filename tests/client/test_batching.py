import numpy as np

from fedtune.client.batching import micro_batches


def test_steps_mode_count_and_coverage():
    b = micro_batches(10, 4, 2, np.random.default_rng(0), local_steps=3)
    assert len(b) == 6 and all(len(x) == 4 for x in b)
    flat = np.concatenate(b)
    assert set(flat[:10].tolist()) == set(range(10))  # first pass covers every example once


def test_epochs_mode_covers_data_exactly():
    b = micro_batches(10, 4, 1, np.random.default_rng(0), local_epochs=1)
    assert [len(x) for x in b] == [4, 4, 2]
    assert sorted(np.concatenate(b).tolist()) == list(range(10))
    half = micro_batches(10, 4, 1, np.random.default_rng(0), local_epochs=0.5)
    assert sum(map(len, half)) == 5


def test_seeded():
    a = micro_batches(50, 8, 1, np.random.default_rng([1, 2, 3]), local_steps=4)
    b = micro_batches(50, 8, 1, np.random.default_rng([1, 2, 3]), local_steps=4)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
