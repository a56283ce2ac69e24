"""The registries are the one source of plug-in names: config values, code and docs all follow them."""

import dataclasses
import inspect
import typing

import pytest

from fedtune.config import AdapterConfig, AggregationConfig, ExperimentConfig
from fedtune.config.compression import CodecConfig
from fedtune.core.registry import AGGREGATORS, ALL, CODECS, COMBINERS, PEFT_METHODS, Registry


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.kind)
def test_every_target_imports(reg: Registry):
    for entry in reg:
        assert reg.load(entry.name) is not None, entry.target


@pytest.mark.parametrize(
    ("model", "field", "reg"),
    [
        (AdapterConfig, "method", PEFT_METHODS),
        (AggregationConfig, "name", AGGREGATORS),
        (AggregationConfig, "combine", COMBINERS),
        (CodecConfig, "name", CODECS),
    ],
)
def test_config_accepts_exactly_the_registered_names(model, field, reg):
    assert typing.get_args(model.model_fields[field].annotation) == reg.names()


def test_codec_options_are_the_codec_fields():
    for entry in CODECS:
        fields = {f.name for f in dataclasses.fields(CODECS.load(entry.name))}
        assert fields == set(entry.options) | set(entry.fixed), entry.name
        assert set(entry.options.values()) <= set(CodecConfig.model_fields), entry.name


@pytest.mark.parametrize("reg", [AGGREGATORS, COMBINERS], ids=lambda r: r.kind)
def test_options_name_real_arguments_and_config_keys(reg):
    for entry in reg:
        params = inspect.signature(reg.load(entry.name)).parameters
        assert set(entry.options) | set(entry.fixed) <= set(params), entry.name
        assert set(entry.options.values()) <= set(AggregationConfig.model_fields), entry.name
        reg.kwargs(entry.name, AggregationConfig())  # every option readable from a default config


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: fedavg, fedavgm"):
        AGGREGATORS.entry("fedsgd")


def test_default_targets_come_from_the_registry():
    cfg = ExperimentConfig()
    assert cfg.adapter.targets() == list(PEFT_METHODS.entry("lora").info["targets"])
    assert AdapterConfig(method="prompt_tuning").targets() == []
