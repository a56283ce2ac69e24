"""Split example indices across clients: IID, Dirichlet over a field, natural by field, quantity skew.

Every partitioner is a pure function of its inputs and seed and returns one sorted index
array per client. A client left with fewer than ``min_examples`` is an error naming the
client and what to change, never a silent empty client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedtune.core.errors import PartitionError

Partition = list[np.ndarray]  # client id -> sorted example indices


def iid(num_examples: int, num_clients: int, seed: int, min_examples: int = 1) -> Partition:
    """Shuffle, then cut into near-equal shares (sizes differ by at most one)."""
    order = np.random.default_rng(seed).permutation(num_examples)
    parts = [np.sort(p) for p in np.array_split(order, num_clients)]
    return _checked(parts, min_examples, "iid", f"only {num_examples} examples for {num_clients} clients")


def dirichlet(labels: Sequence[Any], num_clients: int, alpha: float, seed: int, min_examples: int = 1) -> Partition:
    """Per label, split its examples across clients in proportions drawn from Dir(alpha).

    Small alpha gives each client few labels (strongly non-IID); large alpha tends to IID.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray([str(v) for v in labels])
    buckets: list[list[int]] = [[] for _ in range(num_clients)]
    for value in sorted(set(labels_arr.tolist())):
        idx = rng.permutation(np.flatnonzero(labels_arr == value))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            buckets[client].extend(chunk.tolist())
    parts = [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    return _checked(
        parts,
        min_examples,
        "dirichlet",
        f"alpha={alpha} is too small for {num_clients} clients; "
        "raise partition.alpha, lower partition.num_clients, or change the seed",
    )


def by_field(labels: Sequence[Any], num_clients: int | None, min_examples: int = 1) -> Partition:
    """Natural split: each distinct field value goes wholly to one client (values dealt round-robin)."""
    labels_arr = np.asarray([str(v) for v in labels])
    values = sorted(set(labels_arr.tolist()))
    n = len(values) if num_clients is None else num_clients
    if n > len(values):
        raise PartitionError(
            f"by_field: the field has {len(values)} distinct values ({', '.join(values[:8])}) but "
            f"partition.num_clients={n}; clients {len(values)}..{n - 1} would be empty. Use at most "
            f"{len(values)} clients, or partition.method=dirichlet to spread values over more clients"
        )
    # largest groups first, each to the currently smallest client: balanced and deterministic
    sizes = {v: int((labels_arr == v).sum()) for v in values}
    buckets: list[list[int]] = [[] for _ in range(n)]
    for v in sorted(values, key=lambda v: (-sizes[v], v)):
        target = min(range(n), key=lambda c: (len(buckets[c]), c))
        buckets[target].extend(np.flatnonzero(labels_arr == v).tolist())
    parts = [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    return _checked(parts, min_examples, "by_field", "lower partition.num_clients")


def quantity_skew(num_examples: int, num_clients: int, alpha: float, seed: int, min_examples: int = 1) -> Partition:
    """IID content, skewed sizes: client shares drawn from Dir(alpha), each at least min_examples."""
    if num_examples < num_clients * min_examples:
        raise PartitionError(
            f"quantity_skew: {num_examples} examples cannot give {num_clients} clients "
            f"{min_examples} each; lower partition.num_clients or partition.min_examples"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_examples)
    spare = num_examples - num_clients * min_examples
    shares = rng.dirichlet(np.full(num_clients, alpha))
    extra = np.floor(shares * spare).astype(int)
    extra[np.argmax(shares)] += spare - extra.sum()  # hand the rounding remainder to the largest
    cuts = np.cumsum(extra + min_examples)[:-1]
    parts = [np.sort(p) for p in np.split(order, cuts)]
    return _checked(parts, min_examples, "quantity_skew", "")


def _checked(parts: Partition, min_examples: int, method: str, fix: str) -> Partition:
    for client, p in enumerate(parts):
        if len(p) < min_examples:
            raise PartitionError(
                f"{method}: client {client} got {len(p)} examples (partition.min_examples={min_examples}); {fix}"
            )
    return parts


def label_histogram(parts: Partition, labels: Sequence[Any]) -> list[dict[str, int]]:
    """Per client, how many examples of each label: for reports and non-IID checks."""
    labels_arr = np.asarray([str(v) for v in labels])
    out = []
    for p in parts:
        values, counts = np.unique(labels_arr[p], return_counts=True)
        out.append({str(v): int(c) for v, c in zip(values, counts, strict=True)})
    return out
