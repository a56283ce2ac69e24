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


def test_a_paradigm_declares_continuing_a_round_exactly_when_its_messages_can():
    """``continues_mid_round`` is true of the paradigms whose messages carry ``continues`` (wire/protocol.py),
    which a deployed client reads to go on from the state its round left, and of no other; a paradigm that
    extends another serves that one's messages too."""
    import dataclasses
    import importlib
    import pkgutil

    from fedtune.config.paradigm import paradigm_of
    from fedtune.core.registry import PARADIGMS

    def messages_of(plugin) -> list[type]:
        package = importlib.import_module(plugin.setup.rpartition(".")[0])
        own = [
            obj
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + ".")
            for obj in vars(importlib.import_module(info.name)).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and isinstance(getattr(obj, "KIND", None), str)
        ]
        return own + (messages_of(paradigm_of(plugin.extends)) if plugin.extends else [])

    for entry in PARADIGMS:
        plugin = paradigm_of(entry.name)
        messages = messages_of(plugin)
        assert messages, entry.name
        continuing = any("continues" in {f.name for f in dataclasses.fields(m)} for m in messages)
        assert continuing == plugin.capabilities.continues_mid_round, entry.name
