import numpy as np
import pytest

from fedtune.core.errors import PartitionError
from fedtune.data import partitioners as P

LABELS = [f"t{i % 4}" for i in range(400)]


def _is_partition(parts, n):
    allidx = np.concatenate(parts)
    return len(allidx) == n and len(set(allidx.tolist())) == n


def test_iid_is_a_balanced_deterministic_partition():
    a, b = P.iid(103, 5, seed=1), P.iid(103, 5, seed=1)
    assert _is_partition(a, 103)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert max(map(len, a)) - min(map(len, a)) <= 1
    assert any((x != y).any() for x, y in zip(a, P.iid(103, 5, seed=2), strict=True))


def test_by_field_gives_each_client_whole_labels():
    parts = P.by_field(LABELS, 4)
    hists = P.label_histogram(parts, LABELS)
    assert _is_partition(parts, 400)
    assert all(len(h) == 1 for h in hists)
    assert sorted(next(iter(h)) for h in hists) == ["t0", "t1", "t2", "t3"]
    # fewer clients than labels: labels are grouped, never split
    two = P.label_histogram(P.by_field(LABELS, 2), LABELS)
    assert sorted(len(h) for h in two) == [2, 2]


def test_by_field_too_many_clients_names_empty_client():
    with pytest.raises(PartitionError, match=r"4 distinct values.*clients 4..5 would be empty"):
        P.by_field(LABELS, 6)


def _skew(parts):
    """Mean total-variation distance between client label mix and the global mix."""
    hists = P.label_histogram(parts, LABELS)
    glob = np.array([100, 100, 100, 100]) / 400
    tvs = []
    for h in hists:
        v = np.array([h.get(f"t{i}", 0) for i in range(4)], dtype=float)
        tvs.append(0.5 * np.abs(v / v.sum() - glob).sum())
    return float(np.mean(tvs))


def test_dirichlet_alpha_controls_non_iidness():
    low = P.dirichlet(LABELS, 4, alpha=0.1, seed=3, min_examples=1)
    high = P.dirichlet(LABELS, 4, alpha=100.0, seed=3)
    assert _is_partition(low, 400) and _is_partition(high, 400)
    assert _skew(low) > 0.3 > 0.1 > _skew(high)
    again = P.dirichlet(LABELS, 4, alpha=0.1, seed=3)
    assert all((x == y).all() for x, y in zip(low, again, strict=True))


def test_dirichlet_empty_client_is_an_error_naming_it():
    with pytest.raises(PartitionError, match=r"dirichlet: client \d+ got 0 examples.*raise partition.alpha"):
        P.dirichlet(LABELS[:8], 6, alpha=0.01, seed=0)


def test_quantity_skew_sizes_vary_but_cover_everything():
    parts = P.quantity_skew(400, 5, alpha=0.5, seed=0, min_examples=5)
    sizes = sorted(map(len, parts))
    assert _is_partition(parts, 400) and sizes[0] >= 5
    assert sizes[-1] > 2 * sizes[0]
    with pytest.raises(PartitionError, match="cannot give 5 clients 100 each"):
        P.quantity_skew(400, 5, alpha=0.5, seed=0, min_examples=100)


def test_min_examples_enforced():
    with pytest.raises(PartitionError, match="client 1 got 2 examples"):
        P.iid(7, 3, seed=0, min_examples=3)
