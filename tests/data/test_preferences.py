"""Preference pairs: the built-in set, the record shapes read, their encoding and batches."""

from __future__ import annotations

import json

import pytest

from fedtune.core.errors import DataError
from fedtune.core.registry import DATASET_RECIPES
from fedtune.data.builtin.preferences import generate_preferences
from fedtune.data.builtin.shaped import records
from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.formats import load_examples, record_to_example, write_jsonl
from fedtune.data.tokenize import IGNORE, Encoder, collate_pairs


def test_builtin_pairs_are_the_built_in_problems_with_a_wrong_answer_rejected():
    train, evaluation = generate_preferences(train_per_task=30, eval_per_task=5)
    plain_train, plain_eval = generate_tasks(train_per_task=30, eval_per_task=5)
    assert [e.messages for e in train] == [e.messages for e in plain_train]  # same problems, same split
    assert [e.messages for e in evaluation] == [e.messages for e in plain_eval]
    assert generate_preferences(train_per_task=30, eval_per_task=5)[0] == train  # fixed content
    for ex in train + evaluation:
        assert ex.rejected and ex.rejected != ex.target
        given = ex.messages[0]["content"].split("\n\n", 1)[1]
        if ex.meta["task"] == "arithmetic":  # a near miss: off by at most 10
            a, op, b = given.split()
            right = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert 0 < abs(int(ex.rejected) - right) <= 10
        if ex.meta["task"] == "max_of_list":
            assert int(ex.rejected) in {int(v) for v in given.split(", ")} - {int(ex.target)}


ASK = {"role": "user", "content": "What is 2 + 2?"}


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "task": "sums"},  # trl's standard shape
        {"prompt": [ASK], "chosen": [_reply("4")], "rejected": [_reply("5")], "task": "sums"},  # conversational
        {  # UltraFeedback binarized: each reply the whole conversation, and a copy of the chosen one
            "prompt": "What is 2 + 2?",
            "chosen": [ASK, _reply("4")],
            "rejected": [ASK, _reply("5")],
            "messages": [ASK, _reply("4")],
            "score_chosen": 9.0,
            "task": "sums",
        },
    ],
)
def test_every_preference_shape_reads_as_the_same_pair(record):
    ex = record_to_example(record, "f.jsonl:1")
    assert ex.messages == (ASK, _reply("4")) and ex.rejected == "5" and ex.meta["task"] == "sums"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "missing ['rejected']"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "the same reply"),
        ({"prompt": "q", "chosen": "a", "rejected": " "}, "'rejected' is empty"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "'prompt' is an empty list"),
        ({"chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
        ({"chosen": [ASK, _reply("4")], "rejected": [_reply("5")]}, "continue different conversations"),
        ({"prompt": "other", "chosen": [ASK, _reply("4")], "rejected": [ASK, _reply("5")]}, "not among the user"),
        ({"prompt": "q", "chosen": [ASK], "rejected": "b"}, "last message of 'chosen'"),
        ({"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}, "'chosen' must be a string or"),
    ],
)
def test_a_malformed_pair_says_what_is_wrong_and_where(record, message):
    with pytest.raises(DataError, match="f.jsonl:7") as err:
        record_to_example(record, "f.jsonl:7")
    assert message in str(err.value)


def test_pairs_written_read_back_equal(tmp_path):
    train, _ = generate_preferences(train_per_task=5, eval_per_task=1)
    write_jsonl(train, tmp_path / "pairs.jsonl")
    back = load_examples(tmp_path / "pairs.jsonl")
    assert back == train and [e.meta for e in back] == [e.meta for e in train]


def test_the_preference_recipes_read_their_published_shapes(tmp_path):
    path = tmp_path / "ultrafeedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records("ultrafeedback", 8)))
    pairs = load_examples(path, DATASET_RECIPES.load("ultrafeedback"))
    assert len(pairs) == 8 and all(p.rejected and p.rejected != p.target for p in pairs)
    assert all(len(p.messages) == 2 for p in pairs)  # the prompt's turn, then the chosen reply
    grouped = tmp_path / "fed_chatbotpa.json"
    grouped.write_text(json.dumps(records("fed_chatbotpa", 9)))
    pairs = load_examples(grouped, DATASET_RECIPES.load("fed_chatbotpa"))
    assert sorted({p.meta["client"] for p in pairs}) == ["user_0", "user_1", "user_2"]
    assert all(p.rejected for p in pairs)
    with pytest.raises(DataError, match="preference pair"):  # an SFT record is not a pair
        load_examples(_sft(tmp_path), DATASET_RECIPES.load("ultrafeedback"))


def _sft(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    return path


@pytest.fixture
def tokenizer(tiny):
    return tiny.tokenizer


def test_a_pair_encodes_one_prompt_with_both_replies_and_truncation_keeps_both(tokenizer):
    ex = record_to_example({"prompt": "word " * 40, "chosen": "yes yes", "rejected": "no no no no"}, "x")
    enc, truncated = Encoder(tokenizer, "alpaca", None, 512).encode(ex)
    assert not truncated and enc.input_ids[: enc.prompt_len] == enc.rejected_ids[: enc.prompt_len]
    chosen_len, rejected_len = len(enc.input_ids) - enc.prompt_len, len(enc.rejected_ids) - enc.prompt_len
    short, cut = Encoder(tokenizer, "alpaca", None, enc.prompt_len).encode(ex)  # no room for the whole prompt
    assert cut and max(len(short.input_ids), len(short.rejected_ids)) == enc.prompt_len
    assert len(short.input_ids) - short.prompt_len == chosen_len  # both replies whole
    assert len(short.rejected_ids) - short.prompt_len == rejected_len
    assert short.input_ids[: short.prompt_len] == enc.input_ids[enc.prompt_len - short.prompt_len : enc.prompt_len]


def test_a_pair_batch_is_the_chosen_rows_then_their_rejected_ones(tokenizer):
    train, _ = generate_preferences(train_per_task=3, eval_per_task=1)
    encoded, _ = Encoder(tokenizer, "alpaca", None, 128).encode_all(train[:3])
    batch = collate_pairs(encoded, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["chosen"].tolist() == [True] * 3 + [False] * 3
    for i, e in enumerate(encoded):
        for row, ids in ((i, e.input_ids), (3 + i, e.rejected_ids)):
            assert batch["input_ids"][row, : len(ids)].tolist() == list(ids)
            scored = batch["labels"][row] != IGNORE
            assert scored.nonzero().squeeze(1).tolist() == list(range(e.prompt_len, len(ids)))  # the reply only
    with pytest.raises(ValueError, match="preference pairs"):
        collate_pairs([*encoded, Encoder(tokenizer, "alpaca", None, 128).encode(generate_tasks()[0][0])[0]], 0)
