"""Dataset recipes: the public sets' columns mapped to fedtune's examples and evaluation items.

A recipe reads one record of a set as it is published (on the hub, or a local copy of it: Parquet,
JSONL, JSON, ``save_to_disk``) and returns an ``Example`` (training; extra fields kept for
``partition.field``) or an item (``data.items``; evaluation), naming its natural split field where
the set has one. The registry (``core.registry.DATASET_RECIPES``) lists them; ``docs/data.md`` has
the table. Each is tested on a generated fixture of the same schema (``tests/data/fixtures.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedtune.core.errors import DataError
from fedtune.data.formats import Example, from_instruction, preference_example, record_to_example, scalar_fields
from fedtune.data.items import AnswerItem, ChoiceItem, CodeItem, choice_item, group_of, text

Record = dict[str, Any]
SENTIMENTS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class Recipe:
    """How one public set's records become examples (``example``) and/or items (``item``, of ``shape``)."""

    name: str
    hf_id: str  # the hub id the columns are taken from
    split_field: str | None = None  # the field a natural split goes by (partition.field)
    example: Callable[[Record, str], Example] | None = None
    item: Callable[[Record, str], Any] | None = None
    shape: str | None = None  # the item shape: "choice", "answer" or "code"
    grouped_file: bool = False  # the file is one object {client: [records]}: each record gets `client`


def _alpaca(r: Record, where: str) -> Example:
    extra = {k: v for k, v in r.items() if k not in ("instruction", "input", "output", "text")}
    return _scalars(
        from_instruction(text(r, "instruction", where), text(r, "output", where), _opt(r, "input", where)), extra
    )


def _flowertune(task: str):
    """FlowerTune's ``reformat`` of a challenge's dataset: output -> response; finance and code join
    instruction and input with a space; medical asks the input (its instruction column is dropped);
    general NLP keeps the instruction alone (its input is dropped, as FlowerTune's prompt never shows it)."""

    def convert(r: Record, where: str) -> Example:
        response = text(r, "output", where)
        if task in ("finance", "code"):
            ask = text(r, "instruction", where, empty=True) + " " + _opt(r, "input", where)
        elif task == "medical":
            ask = text(r, "input", where)
        else:
            ask = text(r, "instruction", where)
        if not ask.strip():
            raise DataError(f"{where}: the challenge's instruction is empty")
        return from_instruction(ask, response)

    return convert


def _dolly(r: Record, where: str) -> Example:
    ex = from_instruction(text(r, "instruction", where), text(r, "response", where), _opt(r, "context", where))
    return _scalars(ex, {"category": text(r, "category", where)})


def _dolly_item(r: Record, where: str) -> AnswerItem:
    prompt = _joined(text(r, "instruction", where), _opt(r, "context", where))
    return AnswerItem(prompt, text(r, "response", where), text(r, "category", where))


def _gsm8k(r: Record, where: str) -> Example:
    return from_instruction(text(r, "question", where), _gsm8k_answer(r, where))


def _gsm8k_item(r: Record, where: str) -> AnswerItem:
    return AnswerItem(text(r, "question", where), _gsm8k_answer(r, where))


def _gsm8k_answer(r: Record, where: str) -> str:
    answer = text(r, "answer", where)
    if "####" not in answer:
        raise DataError(f"{where}: a GSM8K answer ends in '#### <number>'; this one has no '####': {answer[-60:]!r}")
    return answer


def _aya(r: Record, where: str) -> Example:
    ex = from_instruction(text(r, "inputs", where), text(r, "targets", where))
    return _scalars(ex, {k: r[k] for k in ("language", "language_code", "user_id", "annotation_type") if k in r})


def _sharegpt(r: Record, where: str) -> Example:
    """FedLLM-Bench's records: {conversations: [{from: human|gpt, value}, ...]}, a leading non-human turn dropped."""
    turns = r.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in roles or not isinstance(t.get("value"), str):
            raise DataError(
                f"{where}: conversations[{i}] must be {{from: human|gpt|system, value: str}}, got {t!r:.80}"
            )
        messages.append({"role": roles[t["from"]], "content": t["value"]})
    if messages[0]["role"] == "assistant":
        messages = messages[1:]
    meta = {k: v for k, v in r.items() if k != "conversations"}
    return record_to_example({"messages": messages, **meta}, where)


def _mmlu(r: Record, where: str) -> ChoiceItem:
    return choice_item(text(r, "question", where), r.get("choices"), r.get("answer"), where, group_of(r, "subject"))


def _medmcqa(r: Record, where: str) -> ChoiceItem:
    options = [text(r, k, where, empty=True) for k in ("opa", "opb", "opc", "opd")]
    return choice_item(text(r, "question", where), options, r.get("cop"), where, group_of(r, "subject_name"))


def _medqa(r: Record, where: str) -> ChoiceItem:
    """GBaker's options {A: text, ...} with answer_idx, or BigBIO's source [{key, value}, ...] with answer_idx."""
    options = r.get("options")
    if isinstance(options, list) and all(isinstance(o, dict) and {"key", "value"} <= set(o) for o in options):
        options = {o["key"]: o["value"] for o in options}
    if not isinstance(options, dict) or not options:
        raise DataError(
            f"{where}: 'options' must be {{A: text, B: text, ...}} or [{{key, value}}, ...], got {options!r:.80}"
        )
    letters = sorted(options)
    answer = r.get("answer_idx")
    return choice_item(text(r, "question", where), [options[k] for k in letters], answer, where)


def _pubmedqa(r: Record, where: str) -> ChoiceItem:
    """qiaojin/PubMedQA (question, context.contexts) or BigBIO's source (QUESTION, CONTEXTS); final_decision."""
    if "QUESTION" in r:
        question, passages = text(r, "QUESTION", where), r.get("CONTEXTS", [])
    else:
        question, context = text(r, "question", where), r.get("context", {})
        passages = context.get("contexts", []) if isinstance(context, dict) else None
    if not isinstance(passages, list) or not all(isinstance(p, str) for p in passages):
        raise DataError(f"{where}: the contexts ('context.contexts' or 'CONTEXTS') must be a list of strings")
    decision = text(r, "final_decision", where)
    choices = ("yes", "no", "maybe")
    if decision not in choices:
        raise DataError(f"{where}: final_decision must be yes, no or maybe, got {decision!r}")
    return ChoiceItem(question, choices, choices.index(decision), context="\n".join(passages))


def _careqa(r: Record, where: str) -> ChoiceItem:
    """CareQA (English): op1..op4 and cop counted from 1."""
    options = [text(r, k, where, empty=True) for k in ("op1", "op2", "op3", "op4")]
    cop = r.get("cop")
    if isinstance(cop, bool) or not isinstance(cop, int) or not 1 <= cop <= 4:
        raise DataError(f"{where}: 'cop' must be the right option's number 1..4, got {cop!r:.40}")
    return choice_item(text(r, "question", where), options, cop - 1, where, group_of(r, "category"))


def _fpb(r: Record, where: str) -> ChoiceItem:
    """financial_phrasebank: label 0 negative, 1 neutral, 2 positive; news (the group names the medium)."""
    return choice_item(text(r, "sentence", where), list(SENTIMENTS), _label(r, "label", 3, where), where, "news")


def _fiqa(r: Record, where: str) -> ChoiceItem:
    """FiQA-2018 sentiment: a score in [-1, 1], bucketed as FinGPT's benchmark does (< -0.1, >= 0.1)."""
    score = r.get("sentiment_score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not -1 <= score <= 1:
        raise DataError(f"{where}: sentiment_score must be a number in [-1, 1], got {score!r:.40}")
    label = 0 if score < -0.1 else 2 if score >= 0.1 else 1  # FinGPT's buckets
    medium = "tweet" if r.get("format") == "post" else "news"  # FiQA's microblog posts and headlines
    return ChoiceItem(text(r, "sentence", where), SENTIMENTS, label, medium)


def _tfns(r: Record, where: str) -> ChoiceItem:
    """twitter-financial-news-sentiment: label 0 bearish, 1 bullish, 2 neutral."""
    label = (0, 2, 1)[_label(r, "label", 3, where)]
    return ChoiceItem(text(r, "text", where), SENTIMENTS, label, "tweet")


def _humaneval(r: Record, where: str) -> CodeItem:
    prefix, entry = text(r, "prompt", where), text(r, "entry_point", where)
    tests = f"{text(r, 'test', where)}\n\ncheck({entry})\n"
    ask = f"Complete the following Python function.\n\n```python\n{prefix}```"
    return CodeItem(ask, tests, prefix, entry, group_of(r, "task_id"), completion=prefix.strip())


def _mbpp(r: Record, where: str) -> CodeItem:
    cases = r.get("test_list")
    if not isinstance(cases, list) or not cases or not all(isinstance(c, str) for c in cases):
        raise DataError(f"{where}: 'test_list' must be a non-empty list of assert statements")
    setup = r.get("test_setup_code") or ""
    task = text(r, "text", where)
    ask = f"{task}\nYour code should pass these tests:\n" + "\n".join(cases)
    completion = f'"""\n{task}\n{cases[0]}\n"""\n'  # bigcode's MBPP prompt: the task and its first test
    return CodeItem(ask, f"{setup}\n" + "\n".join(cases) + "\n", group=group_of(r, "task_id"), completion=completion)


_MULTIPLE_LANGUAGES = {"js": "JavaScript", "cpp": "C++"}


def _multipl_e(r: Record, where: str) -> CodeItem:
    """MultiPL-E's HumanEval in JavaScript or C++: the prompt a completion continues, its tests, stop tokens."""
    language = text(r, "language", where)
    if language not in _MULTIPLE_LANGUAGES:
        raise DataError(f"{where}: language must be one of {', '.join(_MULTIPLE_LANGUAGES)}, got {language!r}")
    stop = r.get("stop_tokens")
    if not isinstance(stop, list) or not all(isinstance(t, str) and t for t in stop):
        raise DataError(f"{where}: 'stop_tokens' must be a list of non-empty strings, got {stop!r:.80}")
    prompt, name = text(r, "prompt", where), text(r, "name", where)
    ask = f"Complete the following {_MULTIPLE_LANGUAGES[language]} function.\n\n```{language}\n{prompt}```"
    tests = text(r, "tests", where)
    return CodeItem(ask, tests, prompt, None, name, language, prompt.strip(), tuple(stop))


def _opt(r: Record, key: str, where: str) -> str:
    return "" if r.get(key) is None else text(r, key, where, empty=True)


def _joined(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if second.strip() else first


def _label(r: Record, key: str, n: int, where: str) -> int:
    value = r.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise DataError(f"{where}: {key!r} must be an integer label 0..{n - 1}, got {value!r:.40}")
    return value


def _scalars(ex: Example, extra: Record) -> Example:
    return Example(ex.messages, {**ex.meta, **scalar_fields(extra)})


ALPACA = Recipe("alpaca", "tatsu-lab/alpaca", example=_alpaca)
ALPACA_GPT4 = Recipe("alpaca_gpt4", "vicgalle/alpaca-gpt4", example=_alpaca)
CODE_ALPACA = Recipe("code_alpaca", "sahil2801/CodeAlpaca-20k", example=_alpaca)
FINGPT_SENTIMENT = Recipe("fingpt_sentiment", "FinGPT/fingpt-sentiment-train", example=_alpaca)
MEDICAL_MEADOW = Recipe("medical_meadow_flashcards", "medalpaca/medical_meadow_medical_flashcards", example=_alpaca)
DOLLY = Recipe("dolly", "databricks/databricks-dolly-15k", "category", _dolly, _dolly_item, "answer")
GSM8K = Recipe("gsm8k", "openai/gsm8k", None, _gsm8k, _gsm8k_item, "answer")
AYA = Recipe("aya", "CohereForAI/aya_dataset", "language", _aya)
ULTRAFEEDBACK = Recipe("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", example=preference_example)
FED_CHATBOTPA = Recipe("fed_chatbotpa", "rui-ye/FedLLM-Bench", "client", preference_example, grouped_file=True)
FEDLLM_BENCH = Recipe("fedllm_bench", "rui-ye/FedLLM-Bench", "client", _sharegpt, grouped_file=True)
MMLU = Recipe("mmlu", "cais/mmlu", "subject", item=_mmlu, shape="choice")
MEDMCQA = Recipe("medmcqa", "openlifescienceai/medmcqa", "subject_name", item=_medmcqa, shape="choice")
MEDQA = Recipe("medqa", "GBaker/MedQA-USMLE-4-options", item=_medqa, shape="choice")
PUBMEDQA = Recipe("pubmedqa", "qiaojin/PubMedQA", item=_pubmedqa, shape="choice")
CAREQA = Recipe("careqa", "HPAI-BSC/CareQA", "category", item=_careqa, shape="choice")
FPB = Recipe("fpb", "takala/financial_phrasebank", item=_fpb, shape="choice")
FLOWERTUNE_GENERAL_NLP = Recipe("flowertune_general_nlp", "vicgalle/alpaca-gpt4", example=_flowertune("general_nlp"))
FLOWERTUNE_FINANCE = Recipe("flowertune_finance", "FinGPT/fingpt-sentiment-train", example=_flowertune("finance"))
FLOWERTUNE_MEDICAL = Recipe(
    "flowertune_medical", "medalpaca/medical_meadow_medical_flashcards", example=_flowertune("medical")
)
FLOWERTUNE_CODE = Recipe("flowertune_code", "flwrlabs/code-alpaca-20k", example=_flowertune("code"))
FIQA = Recipe("fiqa", "pauri32/fiqa-2018", item=_fiqa, shape="choice")
TFNS = Recipe("tfns", "zeroshot/twitter-financial-news-sentiment", item=_tfns, shape="choice")
HUMANEVAL = Recipe("humaneval", "openai/openai_humaneval", item=_humaneval, shape="code")
MBPP = Recipe("mbpp", "google-research-datasets/mbpp", item=_mbpp, shape="code")
MULTIPL_E = Recipe("multipl_e", "nuprl/MultiPL-E", item=_multipl_e, shape="code")
