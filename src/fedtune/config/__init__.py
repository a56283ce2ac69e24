"""Experiment configuration, one module per concept: every default lives here; unknown keys and bad values are errors.

Sections (``model``, ``adapter``, ``data``/``partition``, ``federation``, ``training``, ``aggregation``,
``compression``, ``privacy``, ``evaluation``, ``runtime``, ``output``, ``compare``) each have a module;
``paradigm`` holds the chosen paradigm's own settings, declared by the paradigm (``config/paradigm.py``).
``experiment.py`` is ``ExperimentConfig`` and every rule that spans sections; ``resolve.py`` resolves
``auto`` values once validation has passed; ``loading.py`` reads YAML and overrides; ``reference.py``
renders docs/configuration.md.
"""

from fedtune.config.adapter import AdapterConfig
from fedtune.config.aggregation import AggregationConfig
from fedtune.config.compare import CompareConfig
from fedtune.config.compression import CodecConfig, CompressionConfig
from fedtune.config.data import BuiltinTasksConfig, DataConfig, PartitionConfig
from fedtune.config.evaluation import EvaluationConfig
from fedtune.config.experiment import ExperimentConfig
from fedtune.config.federation import FederationConfig
from fedtune.config.loading import apply_override, config_diff, load_config, set_dotted, to_yaml, validate_config
from fedtune.config.model import ModelConfig
from fedtune.config.output import OutputConfig
from fedtune.config.paradigm import Capabilities, Paradigm, ParadigmConfig
from fedtune.config.privacy import AdaptiveClipConfig, DpSgdConfig, PrivacyConfig, SecureAggregationConfig
from fedtune.config.resolve import resolve
from fedtune.config.runtime import FlowerConfig, RayConfig, RuntimeConfig
from fedtune.config.training import TrainingConfig

__all__ = [
    "AdapterConfig",
    "AdaptiveClipConfig",
    "AggregationConfig",
    "BuiltinTasksConfig",
    "Capabilities",
    "CodecConfig",
    "CompareConfig",
    "CompressionConfig",
    "DataConfig",
    "DpSgdConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FederationConfig",
    "FlowerConfig",
    "ModelConfig",
    "OutputConfig",
    "Paradigm",
    "ParadigmConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RayConfig",
    "RuntimeConfig",
    "SecureAggregationConfig",
    "TrainingConfig",
    "apply_override",
    "config_diff",
    "load_config",
    "resolve",
    "set_dotted",
    "to_yaml",
    "validate_config",
]
