"""Built-in instruction tasks with exactly checkable answers, generated offline.

Four families, each tagged in the ``task`` field so that ``by_field`` partitioning gives
naturally non-IID clients: two-digit arithmetic, unit conversion, string transforms and
max of a list. The content is fixed (its own seed), so results compare across runs;
train and eval problems never overlap.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fedtune.core.errors import DataError
from fedtune.data.formats import Example, from_instruction

DATA_SEED = 20241123
TASKS = ("arithmetic", "unit_conversion", "string_transform", "max_of_list")

_UNITS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("dollars", "cents", 100),
]

_WORDS = tuple(
    dict.fromkeys(  # unique, in a fixed order
        """
        apple river stone cloud music garden window pencil orange forest candle bridge silver planet rocket
        summer winter spring autumn island market doctor letter mirror button dragon castle yellow purple
        monkey rabbit turtle banana cherry lemon butter coffee cookie pepper tomato carrot potato school
        teacher friend family mother father sister brother people animal number simple little bottle paper
        rubber copper marble shadow thunder flower meadow valley desert ocean harbor anchor sailor ticket
        basket jacket pocket wallet hammer ladder blanket pillow carpet kitchen camera laptop engine wheel
        travel circle square triangle violin guitar trumpet piano drummer singer dancer painter writer
        reader player winner
        """.split()
    )
)

_STRING_OPS: list[tuple[str, Callable[[str], str]]] = [
    ("Write the word in capital letters.", str.upper),
    ("Write the word backwards.", lambda w: w[::-1]),
    ("Write the word twice, separated by a space.", lambda w: f"{w} {w}"),
    ("Write the first three letters of the word.", lambda w: w[:3]),
    ("Write the last three letters of the word.", lambda w: w[-3:]),
    ("Write the word with its first letter capitalized.", str.capitalize),
]

_SUFFIX = " Reply with only the answer."


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return "Compute the sum." + _SUFFIX, f"{a} + {b}", str(a + b)
    a, b = max(a, b), min(a, b)
    return "Compute the difference." + _SUFFIX, f"{a} - {b}", str(a - b)


def _unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    src, dst, factor = rng.choice(_UNITS)
    value = rng.randint(2, 60)
    return f"Convert {src} to {dst}." + _SUFFIX, f"{value} {src}", str(value * factor)


def _string_transform(rng: random.Random) -> tuple[str, str, str]:
    instruction, op = rng.choice(_STRING_OPS)
    word = rng.choice(_WORDS)
    return instruction + _SUFFIX, word, op(word)


def _max_of_list(rng: random.Random) -> tuple[str, str, str]:
    values = rng.sample(range(1, 100), rng.randint(4, 6))
    return "Find the largest number in the list." + _SUFFIX, ", ".join(map(str, values)), str(max(values))


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "string_transform": _string_transform,
    "max_of_list": _max_of_list,
}


def _draw(task: str, rng: random.Random, need: int, seen: set[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Up to ``need`` problems of ``task`` not in ``seen`` (which grows), from at most 50 draws each."""
    rows: list[tuple[str, str, str]] = []
    for _ in range(need * 50):
        inst, inp, out = _GENERATORS[task](rng)
        if (inst, inp) not in seen:
            seen.add((inst, inp))
            rows.append((inst, inp, out))
            if len(rows) == need:
                break
    return rows


def generate_tasks(
    tasks: list[str] | tuple[str, ...] = TASKS, train_per_task: int = 400, eval_per_task: int = 25
) -> tuple[list[Example], list[Example]]:
    """Return (train, eval) examples: unique problems per task, eval disjoint from train."""
    train: list[Example] = []
    evaluation: list[Example] = []
    for t_index, task in enumerate(TASKS):
        if task not in tasks:
            continue
        rng = random.Random(DATA_SEED + 7919 * t_index)
        need = train_per_task + eval_per_task
        rows = _draw(task, rng, need, set())
        if len(rows) < need:
            raise DataError(
                f"built-in task {task!r} has only {len(rows)} distinct problems, but data.builtin asks for "
                f"{train_per_task} + {eval_per_task}; lower data.builtin.train_per_task or eval_per_task"
            )
        # eval comes first so that growing train_per_task never moves a problem into eval
        for i, (inst, inp, out) in enumerate(rows):
            ex = from_instruction(inst, out, inp, task=task)
            (evaluation if i < eval_per_task else train).append(ex)
    return train, evaluation


def generate_public(
    tasks: list[str] | tuple[str, ...], train_per_task: int, eval_per_task: int, public_per_task: int
) -> list[Example]:
    """A public set for KD: problems of the same families, disjoint from the training and evaluation
    problems that ``generate_tasks`` makes with the same sizes (it continues each task's stream)."""
    public: list[Example] = []
    for t_index, task in enumerate(TASKS):
        if task not in tasks:
            continue
        rng = random.Random(DATA_SEED + 7919 * t_index)
        seen: set[tuple[str, str]] = set()
        _draw(task, rng, train_per_task + eval_per_task, seen)  # exactly generate_tasks' draws
        rows = _draw(task, rng, public_per_task, seen)
        if len(rows) < public_per_task:
            raise DataError(
                f"built-in task {task!r} has only {len(rows)} distinct problems left beside {train_per_task} "
                f"training and {eval_per_task} evaluation ones; lower data.builtin.public_per_task"
            )
        public.extend(from_instruction(inst, out, inp, task=task) for inst, inp, out in rows)
    return public
