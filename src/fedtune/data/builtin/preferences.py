"""Built-in preference pairs: the built-in tasks' problems with the right answer chosen and a wrong one rejected.

The problems, their split into training and held-out ones and their ``task`` field are ``generate_tasks``' own;
each pair's rejected reply is a near miss drawn from the problem alone (its own seed): a sum off by a little,
a conversion by the wrong factor or off by one unit, another string operation on the same word, the list's
second-largest number. A model that prefers the right answer has learnt something about the task.
"""

from __future__ import annotations

import random
from dataclasses import replace

from fedtune.data.builtin.tasks import _STRING_OPS, _UNITS, DATA_SEED, TASKS, generate_tasks
from fedtune.data.formats import Example


def generate_preferences(
    tasks: list[str] | tuple[str, ...] = TASKS, train_per_task: int = 400, eval_per_task: int = 25
) -> tuple[list[Example], list[Example]]:
    """(train, eval) preference pairs over exactly ``generate_tasks``' problems and split."""
    train, evaluation = generate_tasks(tasks, train_per_task, eval_per_task)
    return [paired(ex) for ex in train], [paired(ex) for ex in evaluation]


def paired(example: Example) -> Example:
    """A built-in task's example with a wrong answer beside its right one."""
    task = example.meta["task"]
    instruction, given = example.messages[0]["content"].split("\n\n", 1)
    rng = random.Random(f"{DATA_SEED}:{task}:{instruction}:{given}")
    return replace(example, rejected=_WRONG[task](rng, given, example.target))


def _arithmetic(rng: random.Random, given: str, right: str) -> str:
    value = int(right)
    offsets = [d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0]
    return str(value + rng.choice(offsets))


def _unit_conversion(rng: random.Random, given: str, right: str) -> str:
    value = int(given.split()[0])
    factor = int(right) // value
    if rng.random() < 0.5:  # a wrong factor
        return str(value * rng.choice(sorted({f for _, _, f in _UNITS} - {factor})))
    return str((value + rng.choice((-1, 1))) * factor)  # one unit off


def _string_transform(rng: random.Random, given: str, right: str) -> str:
    others = sorted({op(given) for _, op in _STRING_OPS} - {right})
    return rng.choice(others)


def _max_of_list(rng: random.Random, given: str, right: str) -> str:
    values = sorted(int(v) for v in given.split(", "))
    return str(values[-2] if rng.random() < 0.7 else values[0])


_WRONG = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "string_transform": _string_transform,
    "max_of_list": _max_of_list,
}
