"""Generated records in the public sets' own schemas: what each dataset recipe reads, made offline.

No hub is reachable here, so the recipes (``data.recipes``) are tested, and the offline benchmark runs,
on records generated in exactly the published columns, with their quirks (GSM8K's ``#### n`` answers,
MedMCQA's ``opa``..``opd``, PubMedQA's nested context, TFNS's bearish/bullish/neutral label order,
HumanEval's prompt-plus-check tests, FedLLM-Bench's {client: [conversations]} file). The content is
checkable (arithmetic, list and string tasks) so that a model can learn it and a score can move.

    records("dolly", 40) -> [{"instruction": ..., "context": ..., "response": ..., "category": ...}, ...]
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from fedtune.data.builtin.preferences import paired
from fedtune.data.builtin.tasks import TASKS, _draw
from fedtune.data.formats import from_instruction

Record = dict[str, Any]
SEED = 20261207
SUBJECTS = ("elementary_mathematics", "high_school_statistics", "computer_science")
CATEGORIES = ("open_qa", "classification", "information_extraction", "brainstorming")
LANGUAGES = ("English", "French", "Spanish")


def records(recipe: str, n: int, seed: int = SEED) -> list[Record] | dict[str, list[Record]]:
    """``n`` records in ``recipe``'s published schema (FedLLM-Bench: a dict of clients, n records in all)."""
    rng = random.Random(f"{seed}:{recipe}")
    return _MAKERS[recipe](rng, n)


def _tasks(rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    """(instruction, input, answer, task) from the built-in families, cycled."""
    per = -(-n // len(TASKS))
    seen: set[tuple[str, str]] = set()
    drawn = {t: _draw(t, rng, per, seen) for t in TASKS}
    return [(*drawn[TASKS[i % len(TASKS)]][i // len(TASKS)], TASKS[i % len(TASKS)]) for i in range(n)]


def _instruction_rows(rng: random.Random, n: int) -> list[Record]:
    return [{"instruction": q, "input": x, "output": a} for q, x, a, _ in _tasks(rng, n)]


def _dolly(rng: random.Random, n: int) -> list[Record]:
    return [
        {"instruction": q, "context": x, "response": a, "category": CATEGORIES[TASKS.index(task)]}
        for q, x, a, task in _tasks(rng, n)
    ]


def _gsm8k(rng: random.Random, n: int) -> list[Record]:
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
        total = (a + b) * c
        q = f"A box holds {a} red and {b} blue marbles. How many marbles are in {c} such boxes?"
        steps = f"One box holds {a} + {b} = <<{a}+{b}={a + b}>>{a + b} marbles.\n"
        steps += f"{c} boxes hold {a + b} * {c} = <<{a + b}*{c}={total}>>{total:,} marbles.\n#### {total:,}"
        rows.append({"question": q, "answer": steps})
    return rows


def _aya(rng: random.Random, n: int) -> list[Record]:
    return [
        {
            "inputs": q,
            "targets": a,
            "language": LANGUAGES[i % 3],
            "language_code": LANGUAGES[i % 3][:2].lower(),
            "annotation_type": "original-annotations",
            "user_id": f"u{i % 5:03d}",
        }
        for i, (q, x, a, _) in enumerate(_tasks(rng, n))
    ]


def _fedllm_bench(rng: random.Random, n: int) -> dict[str, list[Record]]:
    clients: dict[str, list[Record]] = {}
    for i, (q, x, a, _) in enumerate(_tasks(rng, n)):
        turns = [{"from": "human", "value": f"{q}\n{x}"}, {"from": "gpt", "value": a}]
        if i % 4 == 0:
            turns = [{"from": "gpt", "value": "Hello! How can I help?"}, *turns]  # a leading bot turn, dropped
        clients.setdefault(f"user_{i % 3}", []).append({"conversations": turns})
    return clients


def _pairs(rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    """(prompt, chosen, rejected, task): the built-in problems with a near miss rejected (builtin.preferences)."""
    out = []
    for q, x, a, task in _tasks(rng, n):
        pair = paired(from_instruction(q, a, x, task=task))
        out.append((pair.messages[0]["content"], pair.target, pair.rejected or "", task))
    return out


def _ultrafeedback(rng: random.Random, n: int) -> list[Record]:
    """HuggingFaceH4/ultrafeedback_binarized: the prompt, and each reply as the whole conversation."""
    rows = []
    for i, (p, c, r, _) in enumerate(_pairs(rng, n)):
        ask = {"role": "user", "content": p}
        chosen, rejected = [ask, {"role": "assistant", "content": c}], [ask, {"role": "assistant", "content": r}]
        score = {"score_chosen": 8.0, "score_rejected": 3.5}
        rows.append(
            {"prompt": p, "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": rejected, "messages": chosen, **score}
        )
    return rows


def _fed_chatbotpa(rng: random.Random, n: int) -> dict[str, list[Record]]:
    clients: dict[str, list[Record]] = {}
    for i, (p, c, r, _) in enumerate(_pairs(rng, n)):
        clients.setdefault(f"user_{i % 3}", []).append({"prompt": p, "chosen": c, "rejected": r})
    return clients


def _mmlu(rng: random.Random, n: int) -> list[Record]:
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        right = a + b
        options = rng.sample([right, right + 1, right - 1, right + 10], 4)
        rows.append(
            {
                "question": f"What is {a} + {b}?",
                "subject": SUBJECTS[i % 3],
                "choices": [str(o) for o in options],
                "answer": options.index(right),
            }
        )
    return rows


def _medmcqa(rng: random.Random, n: int) -> list[Record]:
    rows = []
    for r in _mmlu(rng, n):
        opa, opb, opc, opd = r["choices"]
        rows.append(
            {
                "id": f"q{len(rows)}",
                "question": r["question"],
                "opa": opa,
                "opb": opb,
                "opc": opc,
                "opd": opd,
                "cop": r["answer"],
                "choice_type": "single",
                "exp": None,
                "subject_name": "Anatomy",
                "topic_name": None,
            }
        )
    return rows


def _medqa(rng: random.Random, n: int) -> list[Record]:
    return [
        {
            "question": r["question"],
            "options": dict(zip("ABCD", r["choices"], strict=True)),
            "answer": r["choices"][r["answer"]],
            "answer_idx": "ABCD"[r["answer"]],
            "meta_info": "step1",
        }
        for r in _mmlu(rng, n)
    ]


def _pubmedqa(rng: random.Random, n: int) -> list[Record]:
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        decision = ("yes", "no", "maybe")[i % 3]
        claim = {"yes": a + b, "no": a + b + 3, "maybe": "about " + str(a + b)}[decision]
        rows.append(
            {
                "pubid": 1000 + i,
                "question": f"Is {a} plus {b} equal to {claim}?",
                "context": {"contexts": [f"We added {a} and {b}."], "labels": ["RESULTS"], "meshes": []},
                "long_answer": "See the sum.",
                "final_decision": decision,
            }
        )
    return rows


def _careqa(rng: random.Random, n: int) -> list[Record]:
    return [
        {
            "exam_id": 1,
            "question": r["question"],
            **{f"op{i + 1}": c for i, c in enumerate(r["choices"])},
            "cop": r["answer"] + 1,
            "year": 2024,
            "category": ("Medicine", "Nursing")[i % 2],
            "unique_id": f"u{i}",
        }
        for i, r in enumerate(_mmlu(rng, n))
    ]


_MOODS = (("fell sharply", 0), ("were flat", 1), ("rose strongly", 2))


def _fpb(rng: random.Random, n: int) -> list[Record]:
    return [
        {"sentence": f"Quarterly profits {m} at company {i}.", "label": lab}
        for i in range(n)
        for m, lab in [_MOODS[rng.randrange(3)]]
    ]


def _fiqa(rng: random.Random, n: int) -> list[Record]:
    score = {0: -0.6, 1: 0.0, 2: 0.5}
    return [
        {
            "sentence": f"Shares of firm {i} {m}.",
            "snippets": "",
            "target": f"firm {i}",
            "sentiment_score": score[lab],
            "aspects": "Stock",
            "format": ("post", "headline")[i % 2],
        }
        for i in range(n)
        for m, lab in [_MOODS[rng.randrange(3)]]
    ]


def _tfns(rng: random.Random, n: int) -> list[Record]:
    bearish_bullish_neutral = {0: 0, 2: 1, 1: 2}  # negative -> 0 bearish, positive -> 1 bullish, neutral -> 2
    return [
        {"text": f"$TICK{i} {m} today", "label": bearish_bullish_neutral[lab]}
        for i in range(n)
        for m, lab in [_MOODS[rng.randrange(3)]]
    ]


def _apply(kind: str, k: int, x: int) -> int:
    return x + k if kind == "add" else x * k


def _code(rng: random.Random, n: int) -> list[tuple[str, str, str, int, str]]:
    """(name, description, body, k, kind) for small integer functions."""
    out = []
    for i in range(n):
        k = rng.randint(2, 9)
        kind = ("add", "times")[i % 2]
        name = f"{kind}_{k}_{i}"
        body = f"x + {k}" if kind == "add" else f"x * {k}"
        text = f"Return x plus {k}." if kind == "add" else f"Return x multiplied by {k}."
        out.append((name, text, body, k, kind))
    return out


def _humaneval(rng: random.Random, n: int) -> list[Record]:
    rows = []
    for i, (name, text, body, k, kind) in enumerate(_code(rng, n)):
        rows.append(
            {
                "task_id": f"HumanEval/{i}",
                "prompt": f'def {name}(x: int) -> int:\n    """{text}"""\n',
                "canonical_solution": f"    return {body}\n",
                "test": "def check(candidate):\n"
                + "".join(f"    assert candidate({x}) == {_apply(kind, k, x)}\n" for x in (0, 3, -2)),
                "entry_point": name,
            }
        )
    return rows


def _mbpp(rng: random.Random, n: int) -> list[Record]:
    rows = []
    for i, (name, text, body, k, kind) in enumerate(_code(rng, n)):
        rows.append(
            {
                "task_id": 11 + i,
                "text": f"Write a function {name}(x) to {text[0].lower()}{text[1:]}",
                "code": f"def {name}(x):\n    return {body}\n",
                "test_list": [f"assert {name}({x}) == {_apply(kind, k, x)}" for x in (0, 3, -2)],
                "test_setup_code": "",
                "challenge_test_list": [],
            }
        )
    return rows


MULTIPLE_STOPS = {"js": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"], "cpp": ["\n}"]}


def _multipl_e(rng: random.Random, n: int) -> list[Record]:
    """MultiPL-E's humaneval-js / humaneval-cpp rows (alternating), as its prompt translators write them."""
    rows = []
    for i, (name, text, _, k, kind) in enumerate(_code(rng, n)):
        cases = [(x, _apply(kind, k, x)) for x in (0, 3, -2)]
        if i % 2 == 0:
            prompt = f"//{text}\nfunction {name}(x){{\n"
            checks = "".join(f"  assert.deepEqual(candidate({x}),{y});\n" for x, y in cases)
            tests = (
                "const assert = require('node:assert');\n\n\nfunction test() {\n"
                f"  let candidate = {name};\n{checks}}}\n\ntest();"
            )
            language = "js"
        else:
            prompt = f"#include<assert.h>\n#include<bits/stdc++.h>\n// {text}\nlong {name}(long x) {{\n"
            checks = "".join(f"    assert(candidate(({x})) == ({y}));\n" for x, y in cases)
            tests = f"}}\nint main() {{\n    auto candidate = {name};\n{checks}}}\n"
            language = "cpp"
        rows.append(
            {
                "name": f"HumanEval_{i}_{name}",
                "language": language,
                "prompt": prompt,
                "doctests": "transform",
                "original": f"../originals/HumanEval_{i}_{name}.py",
                "prompt_terminology": "reworded",
                "tests": tests,
                "stop_tokens": MULTIPLE_STOPS[language],
            }
        )
    return rows


_MAKERS: dict[str, Callable[[random.Random, int], Any]] = {
    "alpaca": _instruction_rows,
    "alpaca_gpt4": _instruction_rows,
    "code_alpaca": _instruction_rows,
    "fingpt_sentiment": _instruction_rows,
    "medical_meadow_flashcards": _instruction_rows,
    "flowertune_general_nlp": _instruction_rows,
    "flowertune_finance": _instruction_rows,
    "flowertune_medical": _instruction_rows,
    "flowertune_code": _instruction_rows,
    "dolly": _dolly,
    "gsm8k": _gsm8k,
    "aya": _aya,
    "fedllm_bench": _fedllm_bench,
    "ultrafeedback": _ultrafeedback,
    "fed_chatbotpa": _fed_chatbotpa,
    "mmlu": _mmlu,
    "medmcqa": _medmcqa,
    "medqa": _medqa,
    "pubmedqa": _pubmedqa,
    "careqa": _careqa,
    "fpb": _fpb,
    "fiqa": _fiqa,
    "tfns": _tfns,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "multipl_e": _multipl_e,
}
