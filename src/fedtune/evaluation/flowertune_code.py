"""Code as FlowerTune's code evaluation scores it (bigcode-evaluation-harness): pass@1 of one sampled program.

Each task is the harness's raw prompt, no chat template (``CodeItem.completion``: HumanEval's prompt
stripped, MBPP's task and first test inside triple quotes, MultiPL-E's prompt stripped). The model samples one
continuation (temperature 0.2, top-p 0.95, no top-k, seed 0) of up to ``MAX_LENGTH`` tokens with the prompt
(the harness's ``max_length_generation``: 1024, 2048 for MBPP), cut at the first of the benchmark's stop
words or the end-of-text token. The program is the prompt, the continuation, a newline and the tests; it
passes when it exits 0 in the sandbox: Python within ``TIMEOUT_S`` (the harness's 3 s), JavaScript on node
(5 s), C++ compiled with g++ -std=c++17 and run (15 s each, MultiPL-E's). pass@1 is the share of tasks
whose program passed (with one sample the unbiased estimator is that share).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.core.errors import ConfigError
from fedtune.data.items import CodeItem
from fedtune.data.tokenize import Encoder
from fedtune.evaluation import sandbox
from fedtune.evaluation.code import sample

SEED = 0  # the harness's --seed
TEMPERATURE, TOP_P = 0.2, 0.95
MAX_LENGTH = {"humaneval": 1024, "mbpp": 2048, "multiple_js": 1024, "multiple_cpp": 1024}
STOPS = {  # the harness's stop words; MultiPL-E's come with each problem (its stop_tokens)
    "humaneval": ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"),
    "mbpp": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"),
}
LANGUAGE = {"humaneval": "python", "mbpp": "python", "multiple_js": "js", "multiple_cpp": "cpp"}
TIMEOUT_S = {"python": 3.0, "js": 5.0, "cpp": 30.0}


def cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest of ``stops`` (the stop word itself dropped)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text


class FlowerTuneCode:
    def __init__(
        self,
        name: str,
        items: Sequence[CodeItem],
        encoder: Encoder,
        benchmark: str | None = None,
        max_new_tokens: int | None = None,
    ):
        if benchmark not in LANGUAGE:
            known = ", ".join(LANGUAGE)
            raise ConfigError(f"evaluation.tasks ({name}): flowertune_code needs benchmark: one of {known}")
        self.name, self.items, self.benchmark = name, list(items), benchmark
        self.language, self.tokenizer = LANGUAGE[benchmark], encoder.tokenizer
        wrong = [i for i, it in enumerate(self.items) if it.language != self.language or not it.completion]
        if wrong:
            it = self.items[wrong[0]]
            raise ConfigError(
                f"evaluation.tasks ({name}): benchmark {benchmark} scores {self.language} tasks with the harness's "
                f"prompt; item {wrong[0]} is {it.language}{'' if it.completion else ' without one'} "
                f"({len(wrong)} such items): read the set through its recipe (humaneval, mbpp, multipl_e) and give "
                "MultiPL-E one language's file per task"
            )
        tok = self.tokenizer
        self.prompts = [tok(it.completion)["input_ids"] for it in self.items]
        most = MAX_LENGTH[benchmark]
        self.budgets = [max(0, most - len(p)) for p in self.prompts]  # the harness: prompt and generation together
        if max_new_tokens is not None:
            self.budgets = [min(b, max_new_tokens) for b in self.budgets]
        eos = [tok.eos_token] if tok.eos_token else []
        self.stops = [(*STOPS.get(benchmark, (*it.stop, "<file_sep>")), *eos) for it in self.items]
        self.limits = sandbox.Limits(timeout_s=TIMEOUT_S[self.language], cpu_s=30, memory_bytes=2**30)
        try:
            sandbox.check_available(self.language)
        except sandbox.SandboxUnavailable as exc:
            why = f"evaluation.tasks ({name}): kind flowertune_code runs no program unsandboxed: {exc}"
            raise ConfigError(why) from None

    def programs(self, model: torch.nn.Module, batch_size: int) -> list[str]:
        """Each task's program: prompt, its sampled continuation cut at a stop word, the tests."""
        stop_words = sorted({s for stops in self.stops for s in stops})
        ids = sample(
            model, self.tokenizer, self.prompts, batch_size, self.budgets, TEMPERATURE, TOP_P, SEED, stop_words
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return [
            f"{it.completion}{cut(text, stops)}\n{it.tests}"
            for it, text, stops in zip(self.items, texts, self.stops, strict=True)
        ]

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        jobs = self.programs(model, batch_size)
        passed = [o.passed for o in sandbox.run_all(jobs, self.limits, self.language)]
        return {f"{self.name}_pass_at_1": sum(passed) / max(1, len(passed))}
