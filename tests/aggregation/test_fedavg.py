"""FedAvg identities, table-driven over every registered aggregator where the definition implies them."""

import itertools

import pytest
import torch

from fedtune.aggregation import AGGREGATORS, Contribution, build_aggregator
from fedtune.aggregation.base import state_from_tensors, state_to_tensors
from fedtune.aggregation.weighting import client_weight
from fedtune.types import TrainReply


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 16, generator=g), "a.lora_B.weight": torch.randn(16, 4, generator=g)}


def _close(x, y):
    return all(torch.allclose(x[k], y[k], atol=1e-6, rtol=0) for k in x)


@pytest.fixture(params=sorted(AGGREGATORS))
def agg(request):
    return build_aggregator(request.param)


def test_one_client_gives_that_client(agg):
    glob, client = _params(0), _params(1)
    delta = {k: client[k] - glob[k] for k in glob}
    new, _ = agg.aggregate(glob, [Contribution(5, delta, 1.0)], agg.init(glob))
    assert _close(new, client)


def test_identical_clients_give_that_client(agg):
    glob, client = _params(0), _params(1)
    delta = {k: client[k] - glob[k] for k in glob}
    contribs = [Contribution(i, delta, w) for i, w in enumerate([3.0, 1.0, 7.0])]
    new, _ = agg.aggregate(glob, contribs, agg.init(glob))
    assert _close(new, client)


def test_client_order_does_not_matter_bitwise(agg):
    glob = _params(0)
    contribs = [Contribution(i, _params(i + 1), float(i + 1)) for i in range(4)]
    results = [agg.aggregate(glob, list(p), agg.init(glob))[0] for p in itertools.permutations(contribs)]
    assert all(torch.equal(r[k], results[0][k]) for r in results for k in r)


def test_fedavg_is_the_weighted_mean_of_client_params():
    agg = build_aggregator("fedavg")
    glob = _params(0)
    clients = [_params(s) for s in (1, 2, 3)]
    weights = [10.0, 30.0, 60.0]
    contribs = [
        Contribution(i, {k: c[k] - glob[k] for k in glob}, w)
        for i, (c, w) in enumerate(zip(clients, weights, strict=True))
    ]
    new, state = agg.aggregate(glob, contribs, agg.init(glob))
    expected = {k: sum(w * c[k] for c, w in zip(clients, weights, strict=True)) / 100.0 for k in glob}
    assert _close(new, expected)
    assert state.rounds == 1


def test_bad_weights_rejected():
    agg = build_aggregator("fedavg")
    glob = _params(0)
    with pytest.raises(ValueError, match="positive"):
        agg.aggregate(glob, [Contribution(0, glob, 0.0)], agg.init(glob))
    with pytest.raises(ValueError, match="zero contributions"):
        agg.aggregate(glob, [], agg.init(glob))


def test_state_round_trips_through_tensors(agg):
    glob = _params(0)
    state = agg.aggregate(glob, [Contribution(0, glob, 1.0)], agg.init(glob))[1]
    tensors, scalars = state_to_tensors(state)
    assert state_from_tensors(agg.init(glob), tensors, scalars) == state


@pytest.mark.parametrize("scheme, expected", [("examples", 12.0), ("tokens", 345.0), ("uniform", 1.0)])
def test_weighting(scheme, expected):
    reply = TrainReply(round=1, delta={}, num_examples=12, num_tokens=345, steps=1, train_loss=0.0, local_train_s=0.0)
    assert client_weight(reply, scheme) == expected
