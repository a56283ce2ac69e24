import re

from fedtune.data.builtin.tasks import TASKS, generate_tasks


def test_deterministic_disjoint_and_tagged():
    train, ev = generate_tasks(train_per_task=50, eval_per_task=10)
    train2, _ev2 = generate_tasks(train_per_task=50, eval_per_task=10)
    assert [e.messages for e in train] == [e.messages for e in train2]
    assert len(train) == 200 and len(ev) == 40
    assert {e.meta["task"] for e in train} == set(TASKS)
    assert not {e.messages[0]["content"] for e in ev} & {e.messages[0]["content"] for e in train}


def test_growing_train_keeps_eval_fixed():
    _, small = generate_tasks(train_per_task=10, eval_per_task=5)
    _, large = generate_tasks(train_per_task=80, eval_per_task=5)
    assert [e.messages for e in small] == [e.messages for e in large]


def test_answers_are_correct():
    train, _ = generate_tasks(train_per_task=60, eval_per_task=1)
    for ex in train:
        prompt, answer = ex.messages[0]["content"], ex.target
        problem = prompt.split("\n\n")[-1]
        task = ex.meta["task"]
        if task == "arithmetic":
            a, op, b = problem.split()
            assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        elif task == "max_of_list":
            assert int(answer) == max(int(x) for x in problem.split(", "))
        elif task == "unit_conversion":
            value = int(problem.split()[0])
            assert int(answer) % value == 0
        elif task == "string_transform":
            assert re.fullmatch(r"[A-Za-z ]+", answer)
            if "backwards" in prompt:
                assert answer == problem[::-1]
