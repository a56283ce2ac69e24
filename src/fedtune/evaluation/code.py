"""Code tasks: generate programs, run each with its tests in the sandbox, report pass@k.

A candidate program is the first fenced code block of the generation (else the whole text), after
the task's ``code_prefix`` (HumanEval's signature and docstring) when it does not define the entry
point itself, followed by the task's tests; it passes when it exits 0 within the limits
(``sandbox.run``: no network, own process tree, CPU / memory / process / file limits, a wall-clock
timeout). With ``samples`` n per task (greedy when 1, else sampled at ``temperature`` from a fixed
seed) and c of them passing, pass@k = 1 - C(n-c, k) / C(n, k), averaged over tasks (Chen et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedtune.core.errors import ConfigError
from fedtune.data.items import CodeItem
from fedtune.data.tokenize import Encoder, left_pad
from fedtune.evaluation import sandbox
from fedtune.evaluation.answers import code_of
from fedtune.evaluation.prompting import chat_prompt
from fedtune.evaluation.scoring import score
from fedtune.models.device import model_device

SAMPLING_SEED = 1234


def program(item: CodeItem, generation: str) -> str:
    """The Python a candidate runs as: its code (after the task's prefix where it continues it), then the tests."""
    code = code_of(generation)
    if item.code_prefix and not (item.entry_point and f"def {item.entry_point}" in code):
        code = item.code_prefix + code
    return f"{code}\n\n{item.tests}"


class PassAtK:
    def __init__(
        self,
        name: str,
        items: Sequence[CodeItem],
        encoder: Encoder,
        max_new_tokens: int = 256,
        samples: int = 1,
        k: Sequence[int] = (1,),
        temperature: float = 0.8,
        timeout_s: float = 10.0,
    ):
        self.name, self.items, self.tokenizer = name, list(items), encoder.tokenizer
        self.max_new_tokens, self.samples, self.k, self.temperature = max_new_tokens, samples, list(k), temperature
        self.limits = sandbox.Limits(timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)))
        other = sorted({it.language for it in self.items} - {"python"})
        if other:
            raise ConfigError(
                f"evaluation.tasks ({name}): kind pass_at_k runs Python; these items are {', '.join(other)} "
                "(MultiPL-E): score them with kind flowertune_code"
            )
        self.prompts = [chat_prompt(encoder, [], it.prompt) for it in self.items]
        try:
            sandbox.check_available()  # a machine that cannot isolate a program runs none
        except sandbox.SandboxUnavailable as exc:
            raise ConfigError(f"evaluation.tasks ({name}): kind pass_at_k runs no program unsandboxed: {exc}") from None

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        texts = self._generate(model, batch_size)  # per item, its samples
        jobs = [program(it, t) for it, ts in zip(self.items, texts, strict=True) for t in ts]
        passed = [o.passed for o in sandbox.run_all(jobs, self.limits)]
        out: dict[str, Any] = {}
        per_item = [sum(passed[i * self.samples : (i + 1) * self.samples]) for i in range(len(self.items))]
        for k in self.k:
            values = [sandbox.pass_at_k(self.samples, c, k) for c in per_item]
            out[f"{self.name}_pass_at_{k}"] = sum(values) / len(values)
        return out

    def _generate(self, model: torch.nn.Module, batch_size: int) -> list[list[str]]:
        if self.samples == 1:
            s = score(model, self.tokenizer, self.prompts, batch_size=batch_size, max_new_tokens=self.max_new_tokens)
            return [[g] for g in s.generations]
        n = self.samples
        rows = [p for p in self.prompts for _ in range(n)]
        ids = sample(model, self.tokenizer, rows, batch_size, self.max_new_tokens, self.temperature)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [texts[i * n : (i + 1) * n] for i in range(len(self.items))]


def sample(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    max_new_tokens: int | Sequence[int],
    temperature: float,
    top_p: float = 0.95,
    seed: int = SAMPLING_SEED,
    stop_strings: Sequence[str] = (),
) -> list[list[int]]:
    """Sampled continuations of ``prompts`` (token ids after each prompt, padding dropped), from a fixed seed
    without touching the caller's random state. ``max_new_tokens``: one bound, or one per prompt (each row
    is cut to its own); ``stop_strings``: a batch stops once every row has written one of them."""
    device = model_device(model)
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = []
    model.eval()
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch, limits = prompts[start : start + batch_size], budgets[start : start + batch_size]
            if max(limits) <= 0:  # prompts that fill the whole length: nothing to continue (the harness's rule)
                out += [[] for _ in batch]
                continue
            ids, mask = left_pad(batch, tok.pad_token_id)  # (B, T)
            extra = {"stop_strings": list(stop_strings), "tokenizer": tok} if stop_strings else {}
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max(limits),
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **extra,
            )  # (B, T + new)
            for row, limit in zip(gen[:, ids.shape[1] :].tolist(), limits, strict=True):
                out.append(_unpadded(row, tok.pad_token_id, tok.eos_token_id)[:limit])
    return out


def _unpadded(row: list[int], pad: int | None, eos: int | None) -> list[int]:
    """A generated row without the padding ``generate`` appends after it ended (its eos kept)."""
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    while row and pad is not None and row[-1] == pad and pad != eos:
        row = row[:-1]
    return row
