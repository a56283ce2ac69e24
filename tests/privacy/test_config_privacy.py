import pytest
import yaml

from fedtune.assembly import plan_of
from fedtune.config import load_config, to_yaml, validate_config
from fedtune.core.errors import ConfigError
from tests.helpers.configs import TINY_OVERRIDES

DP = ["privacy.client_dp=central", "privacy.noise_multiplier=1.0"]


def _cfg(*extra: str):
    return load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *extra])


def plan_privacy(cfg):
    return plan_of(cfg).privacy_plan


def rounds_to_run(cfg) -> int:
    return plan_of(cfg).rounds_to_run


@pytest.mark.parametrize(
    "extra, says",
    [
        (["privacy.noise_multiplier=1.0"], "privacy.client_dp: central"),
        (["privacy.client_dp=central"], "noise_multiplier"),
        ([*DP, "privacy.sampling=fixed", "privacy.accountant=pld"], "fixed-size sampling"),
        ([*DP, "paradigm=kd"], "paradigm kd does not support client-level DP (privacy.client_dp=central)"),
        ([*DP, "aggregation.combine=median"], "aggregation.combine=median"),
        ([*DP, "aggregation.scaffold=true"], "aggregation.scaffold"),
        ([*DP, "aggregation.clip_norm=1.0"], "privacy.clip_norm is the clipping norm"),
        ([*DP, "aggregation.weighting=examples"], "uniform"),
        ([*DP, "aggregation.lora=exact"], "use ffa"),
        ([*DP, "privacy.delta=0.3"], "1 / partition.num_clients"),
        (["privacy.dp_sgd={}", "training.grad_accum=2"], "training.grad_accum"),
        (["privacy.dp_sgd={}", "training.proximal_mu=0.1"], "training.proximal_mu"),
        (["privacy.dp_sgd={}", "training.local_steps=null", "training.local_epochs=1"], "local_epochs"),
        (["privacy.dp_sgd={}", "paradigm=kd"], "paradigm kd does not support DP-SGD (privacy.dp_sgd)"),
    ],
)
def test_what_client_level_dp_cannot_do_is_a_config_error_naming_the_key(extra, says):
    with pytest.raises(ConfigError) as err:
        _cfg(*extra)
    assert says in " ".join(str(err.value).split())


def test_validation_changes_nothing_and_resolution_is_one_explicit_step():
    from fedtune.config import ExperimentConfig, resolve

    raw = {"privacy": {"client_dp": "central", "noise_multiplier": 1.0}, "partition": {"num_clients": 8}}
    validated = ExperimentConfig.model_validate(raw)
    assert (validated.aggregation.lora, validated.aggregation.weighting) == ("auto", "examples")
    resolved = resolve(validated)
    assert (resolved.aggregation.lora, resolved.aggregation.weighting) == ("ffa", "uniform")
    assert (validated.aggregation.lora, validated.aggregation.weighting) == ("auto", "examples")  # untouched
    assert resolve(resolved) is resolved  # nothing left to resolve
    assert resolve(ExperimentConfig()) == ExperimentConfig()  # without privacy nothing changes


def test_lora_auto_becomes_ffa_and_uniform_weighting_is_accepted():
    cfg = _cfg(*DP, "aggregation.weighting=uniform")
    assert cfg.aggregation.lora == "ffa" and cfg.aggregation.lora_mode() == "ffa"
    assert _cfg(*DP, "aggregation.lora=naive").aggregation.lora_mode() == "naive"
    assert _cfg().aggregation.lora_mode() == "exact"  # without privacy nothing changes


def test_the_plan_is_what_the_config_says_and_a_budget_can_shorten_the_run():
    plan = plan_privacy(_cfg(*DP, "federation.clients_per_round=2", "federation.rounds=40"))
    m = plan.mechanism
    assert (m.noise_multiplier, m.sampling, m.population, m.sample_size, m.sample_rate) == (1.0, "poisson", 4, 2, 0.5)
    assert plan.rounds == 40 and not plan.calibrated
    cut = _cfg(*DP, "federation.clients_per_round=2", "federation.rounds=40", "privacy.target_epsilon=6")
    plan = plan_privacy(cut)
    assert 0 < plan.rounds < 40 == plan.planned_rounds and rounds_to_run(cut) == plan.rounds
    assert plan.epsilon(plan.rounds) <= 6 < plan.epsilon(plan.rounds + 1)
    with pytest.raises(ConfigError, match="first round"):
        plan_privacy(_cfg(*DP, "privacy.target_epsilon=0.01"))


def test_a_budget_alone_calibrates_the_noise_for_the_planned_rounds():
    plan = plan_privacy(_cfg("privacy.client_dp=central", "privacy.target_epsilon=4", "federation.rounds=10"))
    assert plan.calibrated and plan.rounds == 10
    assert plan.epsilon(10) <= 4 < plan.mechanism.with_noise(plan.mechanism.noise_multiplier * 0.98).epsilon(10)


def test_adaptive_clipping_with_too_little_count_noise_is_refused():
    with pytest.raises(ConfigError, match="count_noise"):
        plan_privacy(_cfg(*DP, "privacy.adaptive_clip={count_noise: 0.3}"))


def test_a_saved_config_validates_again_with_privacy_off_or_on():
    """A run directory's config.yaml lists every key, defaults included; resume and compare read it back."""
    for extra in [(), DP]:
        cfg = _cfg(*extra)
        again = validate_config(yaml.safe_load(to_yaml(cfg)), "saved")
        assert again == cfg


def test_dp_sgd_alone_leaves_the_servers_aggregation_as_configured():
    cfg = _cfg("privacy.dp_sgd={}", "aggregation.combine=median")
    assert cfg.aggregation.lora == "auto" and cfg.aggregation.weighting == "examples"
