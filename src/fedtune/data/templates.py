"""One prompt template registry, used identically by training and evaluation.

A template turns an Example into (prompt text, target text). Training tokenises prompt +
target + EOS and puts the loss on the target; evaluation generates from the same prompt
and compares the generation with the same target.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from fedtune.core.errors import ConfigError
from fedtune.data.formats import Example

Template = Callable[[Example, PreTrainedTokenizerBase, "str | None"], str]  # -> prompt text


def _chat(example: Example, tokenizer: PreTrainedTokenizerBase, system: str | None) -> str:
    messages = example.prompt_messages
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_ALPACA_HEAD = "Below is an instruction that describes a task. Write a response that completes the request.\n\n"


def _alpaca(example: Example, tokenizer: PreTrainedTokenizerBase, system: str | None) -> str:
    parts = [system + "\n\n" if system else _ALPACA_HEAD]
    for m in example.prompt_messages:
        title = {"system": "Context", "user": "Instruction", "assistant": "Response"}[m["role"]]
        parts.append(f"### {title}:\n{m['content']}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


_FLOWERTUNE_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def _flowertune(example: Example, tokenizer: PreTrainedTokenizerBase, system: str | None) -> str:
    """FlowerTune's training prompt: its Alpaca header, the instruction, "### Response:" (then " answer")."""
    ask = "\n".join(m["content"] for m in example.prompt_messages if m["role"] != "assistant")
    return f"{system or _FLOWERTUNE_HEAD}\n### Instruction:\n{ask}\n### Response:"


TEMPLATES: dict[str, Template] = {"chat": _chat, "alpaca": _alpaca, "flowertune": _flowertune}
TARGET_PREFIX = {"flowertune": " "}  # text between a template's prompt and the target, tokenised with the target


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """'auto' picks the tokenizer's chat template when it has one, else alpaca."""
    if name == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if name == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template=chat but the tokenizer has no chat template; use auto or alpaca")
    if name not in TEMPLATES:
        raise ConfigError(f"data.template={name!r}; allowed: auto, {', '.join(TEMPLATES)}")
    return name


def render_prompt(name: str, example: Example, tokenizer: PreTrainedTokenizerBase, system: str | None) -> str:
    return TEMPLATES[name](example, tokenizer, system)
