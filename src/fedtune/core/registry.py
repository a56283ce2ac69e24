"""One registry per plug-in kind: the names the config accepts, what each one is, where its code lives.

The config's allowed values (``Registry.literal()``), its field descriptions and the generated
configuration reference all derive from these tables, so a plug-in cannot be added in one place and
forgotten in another. Targets are ``"module:attribute"`` strings imported on first use: reading a
config never imports torch. ``tests/test_registry.py`` imports every target.

Adding a plug-in: one ``Entry`` here, its code at the target, and a row in the kind's table tests.
A paradigm's target is the ``Paradigm`` object its package declares (``fedtune.config.paradigm``);
a paradigm outside the package needs no entry: a config names it by its import path
(docs/architecture.md, "Adding a paradigm").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Entry:
    """One plug-in: its config name, a one-line summary, and where its code is.

    ``fixed``: keyword arguments implied by the name (``int8`` -> ``bits=8``); ``options``: keyword
    argument -> the config key that supplies it; ``defaults``: values for options whose config key
    is null; ``info``: kind-specific static data (e.g. a PEFT method's default target modules).
    """

    name: str
    summary: str
    target: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)


class Registry:
    """The entries of one plug-in kind, keyed by name, in their documented order."""

    def __init__(self, kind: str, key: str, entries: Sequence[Entry], external: bool = False):
        """``external``: a name of the form ``package.module:ATTRIBUTE`` also loads, the plug-in at that
        import path (a plug-in outside fedtune, e.g. a paradigm of one's own, named so in a config)."""
        self.kind, self.key, self.external = kind, key, external  # e.g. "codec", "compression.uplink[].name"
        self._entries = {e.name: e for e in entries}
        if len(self._entries) != len(entries):
            raise ValueError(f"duplicate {kind} names in {[e.name for e in entries]}")

    def register(self, entry: Entry) -> None:
        """Add a plug-in in this process (a config naming it by its import path works in every process)."""
        if entry.name in self._entries and self._entries[entry.name] != entry:
            raise ValueError(f"a {self.kind} named {entry.name!r} is registered already ({self._entries[entry.name]})")
        self._entries[entry.name] = entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            if self.external and is_import_path(name):
                return Entry(name, "", name)
            also = " or an import path package.module:ATTRIBUTE" if self.external else ""
            raise ValueError(f"unknown {self.kind} {name!r} ({self.key}); allowed: {', '.join(self._entries)}{also}")
        return self._entries[name]

    def load(self, name: str) -> Any:
        """The entry's code: the attribute its target names (a module when the target has no ``:``)."""
        module, _, attr = self.entry(name).target.partition(":")
        try:
            loaded = importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"{self.kind} {name!r} ({self.key}): cannot import {module}: {exc}") from None
        if attr and not hasattr(loaded, attr):
            raise ValueError(f"{self.kind} {name!r} ({self.key}): {module} has no attribute {attr!r}")
        return getattr(loaded, attr) if attr else loaded

    def kwargs(self, name: str, section: Any) -> dict[str, Any]:
        """Keyword arguments for the entry's target: its fixed ones plus its options read from a config section."""
        e = self.entry(name)
        out = dict(e.fixed)
        for arg, key in e.options.items():
            value = getattr(section, key)
            out[arg] = e.defaults.get(arg) if value is None else value
        return out

    def literal(self) -> Any:
        """``Literal[name, ...]`` for a pydantic field: the config accepts exactly these names."""
        return Literal[self.names()]  # type: ignore[valid-type]

    def describe(self, prefix: str = "") -> str:
        """'name: summary; ...' for a config field's description."""
        return prefix + "; ".join(f"{e.name}: {e.summary}" for e in self._entries.values())


# one line per paradigm: its name and its plug-in object (whose summary, settings and capabilities it declares)
PARADIGMS = Registry(
    "paradigm",
    "paradigm.name",
    [
        Entry("parameter_sharing", "", "fedtune.paradigms.parameter_sharing:PARADIGM"),
        Entry("kd", "", "fedtune.paradigms.kd:PARADIGM"),
        Entry("split", "", "fedtune.paradigms.split:PARADIGM"),
        Entry("offsite", "", "fedtune.paradigms.offsite:PARADIGM"),
        Entry("fedkseed", "", "fedtune.paradigms.fedkseed:PARADIGM"),
        Entry("personalised", "", "fedtune.paradigms.personalised:PARADIGM"),
        Entry("dpo", "", "fedtune.paradigms.dpo:PARADIGM"),
    ],
    external=True,
)

AGGREGATORS = Registry(
    "server optimizer",
    "aggregation.name",
    [
        Entry(
            "fedavg",
            "FedAvg, w + η·mean (McMahan et al. 2017)",
            "fedtune.aggregation.server_opt:Sgd",
            options={"lr": "server_lr"},
            defaults={"lr": 1.0},
        ),
        Entry(
            "fedavgm",
            "FedAvgM, server momentum (Hsu et al. 2019)",
            "fedtune.aggregation.server_opt:Momentum",
            options={"lr": "server_lr", "beta": "momentum"},
            defaults={"lr": 1.0},
        ),
        *(
            Entry(
                f"fed{rule}",
                f"Fed{rule.capitalize()}, adaptive server optimizer (Reddi et al. 2021)",
                "fedtune.aggregation.server_opt:Adaptive",
                fixed={"rule": rule},
                options={"lr": "server_lr", "beta1": "beta1", "beta2": "beta2", "tau": "tau"}
                | {"bias_correction": "bias_correction"},
                defaults={"lr": 1e-2},
            )
            for rule in ("adam", "yogi", "adagrad")
        ),
    ],
)

COMBINERS = Registry(
    "combiner",
    "aggregation.combine",
    [
        Entry("mean", "weighted mean", "fedtune.aggregation.combine:weighted_mean"),
        Entry("median", "coordinate-wise median (Yin et al. 2018)", "fedtune.aggregation.combine:coordinate_median"),
        Entry(
            "trimmed_mean",
            "coordinate-wise mean without the trim_fraction extremes (Yin et al. 2018)",
            "fedtune.aggregation.combine:trimmed_mean",
            options={"beta": "trim_fraction"},
        ),
        Entry(
            "krum",
            "the krum_select updates with the best Krum scores (Blanchard et al. 2017)",
            "fedtune.aggregation.combine:krum",
            options={"byzantine": "byzantine", "select": "krum_select"},
        ),
    ],
)

_QUANT = {"per": "per", "rounding": "rounding"}
_VALUE = {"value": True}  # a value codec: keeps every entry (may carry an adapter, not only an update)
_PEFT = {"peft": True}
_PC = "fedtune.adapters.peft_configs:"
CODECS = Registry(
    "codec",
    "compression.uplink[].name / compression.downlink[].name",
    [
        Entry("fp16", "cast to float16", "fedtune.codecs.cast:Cast", fixed={"dtype": "float16"}, info=_VALUE),
        Entry("bf16", "cast to bfloat16", "fedtune.codecs.cast:Cast", fixed={"dtype": "bfloat16"}, info=_VALUE),
        Entry("int8", "8-bit quantisation", "fedtune.codecs.quantize:Quantize", {"bits": 8}, _QUANT, info=_VALUE),
        Entry("int4", "4-bit quantisation", "fedtune.codecs.quantize:Quantize", {"bits": 4}, _QUANT, info=_VALUE),
        Entry("topk", "largest-magnitude entries", "fedtune.codecs.sparsify:TopK", options={"fraction": "fraction"}),
        Entry("randk", "seeded random entries", "fedtune.codecs.sparsify:RandomK", options={"fraction": "fraction"}),
        Entry("lowrank", "truncated SVD of each matrix", "fedtune.codecs.lowrank:LowRank", options={"rank": "rank"}),
        Entry(
            "block_dropout",
            "whole layer blocks dropped (FedOBD)",
            "fedtune.codecs.block_dropout:BlockDropout",
            options={"keep_fraction": "keep_fraction"},
        ),
    ],
)
VALUE_CODECS = tuple(e.name for e in CODECS if e.info.get("value"))  # keep every value (no sparsifying)

_IN_BLOCKS = {"in_blocks": True, "layered": True}  # every tensor inside a block; adapter.layers confines them
PEFT_METHODS = Registry(
    "PEFT method",
    "adapter.method",
    [
        Entry(
            "lora",
            "low-rank updates B·A (dora: true for DoRA)",
            _PC + "lora",
            info={"peft": True, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], **_IN_BLOCKS},
        ),
        Entry(
            "ia3",
            "learned activation scales",
            _PC + "ia3",
            info={"peft": True, "targets": ["k_proj", "v_proj", "down_proj"], **_IN_BLOCKS},
        ),
        Entry("prompt_tuning", "soft prompt", _PC + "prompt_tuning", info=_PEFT),
        Entry("prefix_tuning", "per-layer prefixes", _PC + "prefix_tuning", info=_PEFT),
        Entry("p_tuning", "soft prompt from an MLP encoder", _PC + "p_tuning", info=_PEFT),
        Entry(
            "bottleneck",
            "Houlsby adapters",
            "fedtune.adapters.bottleneck:TUNER",
            info={"peft": False, "targets": ["o_proj", "down_proj"], **_IN_BLOCKS},
        ),
        Entry(
            "bitfit",
            "biases only",
            "fedtune.adapters.bitfit:TUNER",
            info={"peft": False, "layered": True, "in_base": True},
        ),
        Entry(
            "blocks",
            "every weight of the chosen blocks (adapter.layers): full tuning of them",
            "fedtune.adapters.block_tuning:TUNER",
            info={"peft": False, **_IN_BLOCKS, "in_base": True},
        ),
    ],
)
SPLIT_METHODS = tuple(e.name for e in PEFT_METHODS if e.info.get("in_blocks"))  # every tensor inside a block
LAYERED_METHODS = tuple(e.name for e in PEFT_METHODS if e.info.get("layered"))  # adapter.layers confines them


def trains_base(method: str) -> bool:
    """Whether ``adapter.method`` trains the base model's own tensors (BitFit's biases, whole blocks) rather than
    tensors it adds."""
    return bool(PEFT_METHODS.entry(method).info.get("in_base"))


ALL: tuple[Registry, ...] = (PARADIGMS, AGGREGATORS, COMBINERS, CODECS, PEFT_METHODS)


def is_import_path(name: str) -> bool:
    """``package.module:ATTRIBUTE``: dotted identifiers, one colon, one identifier."""
    module, sep, attr = name.partition(":")
    return bool(sep) and attr.isidentifier() and all(part.isidentifier() for part in module.split("."))


_R = "fedtune.data.recipes:"
_TRAIN, _EVAL, _BOTH = {"uses": ("training",)}, {"uses": ("evaluation",)}, {"uses": ("training", "evaluation")}
DATASET_RECIPES = Registry(
    "dataset recipe",
    "data.recipe / evaluation.tasks[].recipe",
    [
        Entry("alpaca", "Alpaca (tatsu-lab/alpaca): instruction, input, output", _R + "ALPACA", info=_TRAIN),
        Entry("alpaca_gpt4", "alpaca-gpt4 (vicgalle/alpaca-gpt4): Alpaca's columns", _R + "ALPACA_GPT4", info=_TRAIN),
        Entry("dolly", "Dolly-15k: instruction, context, response; split by category", _R + "DOLLY", info=_BOTH),
        Entry("code_alpaca", "Code-Alpaca-20k: Alpaca's columns", _R + "CODE_ALPACA", info=_TRAIN),
        Entry("gsm8k", "GSM8K: question, answer ending '#### n'", _R + "GSM8K", info=_BOTH),
        Entry(
            "fingpt_sentiment",
            "fingpt-sentiment-train: instruction, input, output",
            _R + "FINGPT_SENTIMENT",
            info=_TRAIN,
        ),
        Entry(
            "medical_meadow_flashcards",
            "medical-meadow flashcards: instruction, input, output",
            _R + "MEDICAL_MEADOW",
            info=_TRAIN,
        ),
        Entry("aya", "Aya dataset: inputs, targets; split by language", _R + "AYA", info=_TRAIN),
        Entry(
            "ultrafeedback",
            "UltraFeedback binarized: prompt, chosen and rejected conversations (preference pairs)",
            _R + "ULTRAFEEDBACK",
            info=_TRAIN,
        ),
        Entry(
            "fed_chatbotpa",
            "Fed-ChatbotPA (FedLLM-Bench): {client: [{prompt, chosen, rejected}]}; split by client",
            _R + "FED_CHATBOTPA",
            info=_TRAIN,
        ),
        Entry(
            "fedllm_bench",
            "FedLLM-Bench: {client: [{conversations}]}; split by client",
            _R + "FEDLLM_BENCH",
            info=_TRAIN,
        ),
        *(
            Entry(
                f"flowertune_{t}",
                f"FlowerTune's {t.replace('_', ' ')} challenge set with its preprocessing (docs/flowertune.md)",
                _R + f"FLOWERTUNE_{t.upper()}",
                info=_TRAIN,
            )
            for t in ("general_nlp", "finance", "medical", "code")
        ),
        Entry("mmlu", "MMLU: question, choices, answer; by subject", _R + "MMLU", info=_EVAL),
        Entry("medmcqa", "MedMCQA: question, opa..opd, cop; by subject_name", _R + "MEDMCQA", info=_EVAL),
        Entry(
            "medqa",
            "MedQA (USMLE, 4 options): question, options ({A: text} or BigBIO's [{key, value}]), answer_idx",
            _R + "MEDQA",
            info=_EVAL,
        ),
        Entry(
            "pubmedqa",
            "PubMedQA: question, context, final_decision yes/no/maybe (or BigBIO's QUESTION, CONTEXTS)",
            _R + "PUBMEDQA",
            info=_EVAL,
        ),
        Entry("careqa", "CareQA (English): question, op1..op4, cop 1-4; by category", _R + "CAREQA", info=_EVAL),
        Entry("fpb", "Financial PhraseBank: sentence, label 0-2", _R + "FPB", info=_EVAL),
        Entry("fiqa", "FiQA-2018 sentiment: sentence, sentiment_score", _R + "FIQA", info=_EVAL),
        Entry("tfns", "Twitter financial news sentiment: text, label", _R + "TFNS", info=_EVAL),
        Entry("humaneval", "HumanEval: prompt, test, entry_point", _R + "HUMANEVAL", info=_EVAL),
        Entry("mbpp", "MBPP: text, test_list, test_setup_code", _R + "MBPP", info=_EVAL),
        Entry(
            "multipl_e",
            "MultiPL-E's HumanEval in JavaScript or C++ (humaneval-js, humaneval-cpp): name, language, prompt, "
            "tests, stop_tokens",
            _R + "MULTIPL_E",
            info=_EVAL,
        ),
    ],
)

_E = "fedtune.evaluation."
EVAL_KINDS = Registry(
    "evaluation kind",
    "evaluation.tasks[].kind",
    [
        Entry(
            "multiple_choice",
            "MMLU-style questions, k-shot, scored by the answer letter's next-token log-probability or each "
            "option's log-likelihood; accuracy overall, per group and averaged over groups",
            _E + "choice:MultipleChoice",
            info={"shape": "choice", "options": ("shots", "method")},
        ),
        Entry(
            "label_choice",
            "classification (e.g. negative/neutral/positive): the label with the highest log-likelihood after "
            "the run's prompt; accuracy and macro-F1",
            _E + "choice:LabelChoice",
            info={"shape": "choice", "options": ()},
        ),
        Entry(
            "sentiment_generation",
            "financial sentiment as FinGPT and FlowerTune's finance evaluation score it: their prompt, greedy "
            "text, the label read by their rule; accuracy and macro-F1",
            _E + "sentiment:SentimentGeneration",
            info={"shape": "choice", "options": ("max_new_tokens",)},
        ),
        Entry(
            "flowertune_mmlu",
            "MMLU as FlowerTune's general-NLP evaluation scores it: its prompt, one generated token, its "
            "answer parsing; accuracy per category (stem, social_sciences, humanities, other)",
            _E + "flowertune_qa:FlowerTuneMmlu",
            info={"shape": "choice", "options": ()},
        ),
        Entry(
            "flowertune_medical",
            "PubMedQA, MedMCQA, MedQA or CareQA as FlowerTune's medical evaluation scores them: its instruction "
            "for the benchmark, greedy tokens as long as the gold answer, its answer parsing; accuracy",
            _E + "flowertune_qa:FlowerTuneMedical",
            info={
                "shape": "choice",
                "options": ("benchmark",),
                "benchmarks": ("pubmedqa", "medmcqa", "medqa", "careqa"),
            },
        ),
        Entry(
            "flowertune_code",
            "HumanEval, MBPP or MultiPL-E (JS, C++) as FlowerTune's code evaluation (bigcode-evaluation-harness) "
            "scores them: the harness's raw prompt, one sample at temperature 0.2 cut at its stop words, the "
            "program run with its tests in the sandbox; pass@1",
            _E + "flowertune_code:FlowerTuneCode",
            info={
                "shape": "code",
                "options": ("benchmark", "max_new_tokens"),
                "benchmarks": ("humaneval", "mbpp", "multiple_js", "multiple_cpp"),
            },
        ),
        Entry(
            "answer_extraction",
            "generate, extract the final answer (GSM8K's '#### n', else the last number), compare numerically",
            _E + "generated:AnswerExtraction",
            info={"shape": "answer", "options": ("shots", "max_new_tokens", "chain_of_thought")},
        ),
        Entry(
            "rouge_l",
            "generate and score ROUGE-L F1 against the reference (rouge-score)",
            _E + "generated:RougeL",
            info={"shape": "answer", "options": ("max_new_tokens",)},
        ),
        Entry(
            "pass_at_k",
            "generate programs and run each with its tests in the sandbox; pass@k by the unbiased estimator",
            _E + "code:PassAtK",
            info={"shape": "code", "options": ("max_new_tokens", "samples", "k", "temperature", "timeout_s")},
        ),
    ],
)
