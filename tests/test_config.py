from pathlib import Path

import pytest

from fedtune.config import apply_override, config_diff, load_config
from fedtune.core.errors import ConfigError


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.federation.rounds >= 1
    assert cfg.clients_per_round() == cfg.partition.num_clients


def test_unknown_key_names_key_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  roundz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "federation.roundz" in msg and "Did you mean 'rounds'" in msg and str(path) in msg


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"training.lr_schedule.*'constant', 'linear' or 'cosine'"):
        load_config(None, ["training.lr_schedule=exponential"])


def test_override_types_are_yaml():
    cfg = load_config(None, ["training.lr=2e-4", "adapter.target_modules=[q_proj,v_proj]", "federation.rounds=7"])
    assert cfg.training.lr == 2e-4
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.federation.rounds == 7


def test_override_without_equals_is_error():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["federation.rounds"])


def test_override_into_a_value_is_error():
    raw = {"seed": 3}
    with pytest.raises(ConfigError, match="seed is a value"):
        apply_override(raw, "seed.x=1")


def test_epochs_replace_default_steps_but_both_is_error():
    assert load_config(None, ["training.local_epochs=1"]).training.local_steps is None
    with pytest.raises(ConfigError, match="exactly one of training.local_steps"):
        load_config(None, ["training.local_epochs=1", "training.local_steps=3"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["partition.method=dirichlet"], "partition.field is required"),
        (["federation.clients_per_round=9", "partition.num_clients=4"], "exceeds partition.num_clients"),
        (["evaluation.per_client=true"], "holdout_fraction"),
        (["training.lr=-1"], "training.lr"),
    ],
)
def test_cross_field_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_fraction_sampling():
    cfg = load_config(None, ["partition.num_clients=10", "federation.fraction=0.3"])
    assert cfg.clients_per_round() == 3


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_config_diff_lists_changed_keys():
    a, b = load_config(None), load_config(None, ["training.lr=0.5", "seed=3"])
    assert set(config_diff(a, b)) == {"training.lr", "seed"}


def test_lora_mode_resolution():
    assert load_config(None).aggregation.lora_mode() == "exact"
    assert load_config(None, ["aggregation.name=fedadam"]).aggregation.lora_mode() == "naive"
    assert load_config(None, ["aggregation.combine=median"]).aggregation.lora_mode() == "naive"
    assert load_config(None, ["aggregation.lora=ffa", "aggregation.name=fedyogi"]).aggregation.lora_mode() == "ffa"
    with pytest.raises(ConfigError, match="aggregation.lora=exact aggregates LoRA products with FedAvg"):
        load_config(None, ["aggregation.lora=exact", "aggregation.scaffold=true"])


def test_client_ranks_are_checked():
    cfg = load_config(None, ["adapter.r=16", "adapter.client_ranks=[2,4,8,16]"])
    assert [cfg.adapter.rank_of_client(c) for c in range(6)] == [2, 4, 8, 16, 2, 4]
    with pytest.raises(ConfigError, match="exceed adapter.r=8"):
        load_config(None, ["adapter.client_ranks=[4,16]"])
    with pytest.raises(ConfigError, match="heterogeneous LoRA ranks"):
        load_config(None, ["adapter.client_ranks=[2,8]", "aggregation.name=fedadam"])
    with pytest.raises(ConfigError, match="heterogeneous LoRA ranks"):
        load_config(None, ["adapter.client_ranks=[2,8]", "aggregation.lora=ffa"])


@pytest.mark.parametrize("path", sorted(Path("examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    assert load_config(path).model.name
