"""FlowerTune's code columns: the harness's prompts, stop words and program assembly, run per language."""

from __future__ import annotations

import json
import shutil

import pytest

from fedtune.config.evaluation import EvalTaskConfig
from fedtune.core.errors import ConfigError
from fedtune.core.registry import DATASET_RECIPES
from fedtune.data.builtin.shaped import records
from fedtune.data.items import load_items
from fedtune.data.tokenize import Encoder
from fedtune.evaluation import flowertune_code as ft
from fedtune.evaluation import sandbox

NEEDS = {"humaneval": None, "mbpp": None, "multiple_js": "node", "multiple_cpp": "g++"}


def _items(tmp_path, recipe, n, language=None):
    rows = [r for r in records(recipe, n) if language is None or r["language"] == language]
    path = tmp_path / f"{recipe}-{language}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, load_items(str(path), DATASET_RECIPES.load(recipe))


def _task(tiny, tmp_path, benchmark, n=4):
    recipe, language = {"multiple_js": ("multipl_e", "js"), "multiple_cpp": ("multipl_e", "cpp")}.get(
        benchmark, (benchmark, None)
    )
    rows, items = _items(tmp_path, recipe, 2 * n if language else n, language)
    return rows, ft.FlowerTuneCode(benchmark, items, Encoder(tiny.tokenizer, "chat", None, 256), benchmark)


def test_the_harness_prompts(tmp_path):
    he_rows, he = _items(tmp_path, "humaneval", 1)
    assert he[0].completion == he_rows[0]["prompt"].strip() and he[0].completion.endswith('"""')
    mbpp_rows, mbpp = _items(tmp_path, "mbpp", 1)
    assert mbpp[0].completion == f'"""\n{mbpp_rows[0]["text"]}\n{mbpp_rows[0]["test_list"][0]}\n"""\n'
    js_rows, js = _items(tmp_path, "multipl_e", 2, "js")
    assert js[0].completion == js_rows[0]["prompt"].strip() and js[0].language == "js"
    assert js[0].stop == ("\nfunction ", "\n/*", "\n//", "\nconsole.log")


def test_a_continuation_ends_at_the_earliest_stop_word():
    assert ft.cut("    return x\ndef other():\n#", ft.STOPS["humaneval"]) == "    return x"
    assert ft.cut("  return 1;\n}", ["\n}"]) == "  return 1;"
    assert ft.cut("no stop here", ft.STOPS["mbpp"]) == "no stop here"


def _right(benchmark, row):
    """A right continuation for a shaped row (whose function is {add|times}_{k}_{i}), with junk after a stop word."""
    if "entry_point" in row:
        name = row["entry_point"]
    elif "test_list" in row:
        name = row["test_list"][0].split()[1].split("(")[0]
    else:
        name = row["name"].split("_", 2)[2]
    kind, k, _ = name.split("_")
    expr = f"x + {k}" if kind == "add" else f"x * {k}"
    return {
        "humaneval": f"\n    return {expr}\n\ndef junk(:\n",
        "mbpp": f"def {name}(x):\n    return {expr}\nassert junk\n",
        "multiple_js": f"\n  return {expr};\n}}\n// junk that would not parse (\n",
        "multiple_cpp": f"\n    return {expr};\n}}\nint junk( {{\n",
    }[benchmark]


@pytest.mark.parametrize("benchmark", list(NEEDS))
def test_programs_are_prompt_continuation_and_tests_and_run_in_their_language(tiny, tmp_path, monkeypatch, benchmark):
    tool = NEEDS[benchmark]
    if tool and shutil.which(tool, path="/usr/bin:/bin") is None:
        pytest.skip(f"no {tool} on this machine")
    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailable:
        pytest.skip("this machine cannot isolate a program")
    rows, task = _task(tiny, tmp_path, benchmark)
    tok = tiny.tokenizer
    texts = [_right(benchmark, rows[0]), _right(benchmark, rows[1]).replace("x + ", "x - ").replace("x * ", "x + "),
             _right(benchmark, rows[2]), "\n"]  # right, wrong, right, nothing  # fmt: skip
    for t in texts:
        assert tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t  # the tiny tokenizer round-trips
    seen = {}

    def fake(model, tok_, prompts, batch_size, budgets, temperature, top_p, seed, stop_strings):
        seen.update(budgets=budgets, temperature=temperature, top_p=top_p, seed=seed, stops=stop_strings)
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    monkeypatch.setattr(ft, "sample", fake)
    assert task.run(tiny.model, 4) == {f"{benchmark}_pass_at_1": 0.5}
    assert (seen["temperature"], seen["top_p"], seen["seed"]) == (0.2, 0.95, 0)
    most = ft.MAX_LENGTH[benchmark]
    assert seen["budgets"] == [most - len(tok(it.completion)["input_ids"]) for it in task.items]
    assert tok.eos_token in seen["stops"]


def test_real_sampling_is_seeded_and_keeps_each_rows_budget(tiny, tmp_path):
    _, task = _task(tiny, tmp_path, "humaneval", 3)
    task.budgets = [3, 5, 1]
    first = ft.sample(tiny.model, tiny.tokenizer, task.prompts, 2, task.budgets, 0.2, 0.95, 0, ["\ndef"])
    again = ft.sample(tiny.model, tiny.tokenizer, task.prompts, 2, task.budgets, 0.2, 0.95, 0, ["\ndef"])
    assert first == again and all(len(ids) <= b for ids, b in zip(first, task.budgets, strict=True))
    full = ft.sample(tiny.model, tiny.tokenizer, task.prompts[:2], 2, [0, 0], 0.2, 0.95, 0)
    assert full == [[], []]  # prompts that already fill max_length get no continuation


def test_the_benchmark_must_fit_the_items(tiny, tmp_path):
    _, js = _items(tmp_path, "multipl_e", 2, "js")
    with pytest.raises(ConfigError, match="benchmark multiple_cpp scores cpp tasks"):
        ft.FlowerTuneCode("x", js, Encoder(tiny.tokenizer, "chat", None, 256), "multiple_cpp")
    with pytest.raises(ValueError, match="needs benchmark"):
        EvalTaskConfig(kind="flowertune_code", dataset="d.jsonl", recipe="multipl_e")
    assert EvalTaskConfig(kind="flowertune_code", dataset="d.jsonl", recipe="mbpp").benchmark == "mbpp"
    with pytest.raises(ValueError, match="scores humaneval, mbpp"):
        EvalTaskConfig(kind="flowertune_code", dataset="d.jsonl", benchmark="medqa")
