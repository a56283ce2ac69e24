"""Recipe-level choices that need no model: what a client's reported counts may weigh."""

import numpy as np
import pytest

from fedtune.config import validate_config
from fedtune.data.prepare import FederatedData
from fedtune.experiment import DEPLOYED_MAX_EXAMPLES, weight_cap

DATA = FederatedData(train=[], eval=[], parts=[np.arange(7), np.arange(30), np.arange(12)], builtin=True)


@pytest.mark.parametrize(
    ("overrides", "examples"),
    [
        ({}, 30),  # simulation: the largest partition
        ({"runtime": {"name": "flower"}}, DEPLOYED_MAX_EXAMPLES),  # the server does not see the clients' data
        ({"federation": {"max_client_examples": 9}}, 9),
        ({"runtime": {"name": "flower"}, "federation": {"max_client_examples": 500}}, 500),
    ],
)
def test_weight_cap_is_what_a_clients_data_could_give(overrides, examples):
    cfg = validate_config({"model": {"name": "tiny"}, "partition": {"num_clients": 3}, **overrides}, "test")
    cap = weight_cap(cfg, DATA)
    assert cap.max_examples == examples and cap.of("tokens") == examples * cfg.data.max_seq_len
