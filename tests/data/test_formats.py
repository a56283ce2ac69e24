import json

import pytest

from fedtune.core.errors import DataError
from fedtune.data.formats import load_examples, record_to_example

INSTR = {"instruction": "Add", "input": "1 + 2", "output": "3", "task": "math"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "lang": "en"}


def test_instruction_record_becomes_chat_with_meta():
    ex = record_to_example(INSTR, "x")
    assert ex.messages[0] == {"role": "user", "content": "Add\n\n1 + 2"}
    assert ex.target == "3" and ex.meta == {"task": "math"}


def test_chat_record():
    ex = record_to_example(CHAT, "x")
    assert ex.target == "hello" and ex.meta == {"lang": "en"}


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"question": "q"}, "expected either 'messages'"),
        ({"instruction": "a", "output": 3}, "'output' must be a string"),
        ({"instruction": "a", "output": "  "}, "'output' is empty"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role is 'bot'"),
        ({"messages": [{"role": "user", "x": 1}, {"role": "assistant", "content": "a"}]}, r"messages\[0\] must be"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "at least one prompt turn"),
        ([1, 2], "record is a list"),
    ],
)
def test_malformed_records_say_what_was_expected(record, needle):
    with pytest.raises(DataError, match=needle):
        record_to_example(record, "f.jsonl:7")


def test_jsonl_error_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(INSTR) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(p)
    assert f"{p}:3:" in str(err.value) and "missing ['output']" in str(err.value)


def test_jsonl_bad_json_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(INSTR) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"{p}:2: not valid JSON"):
        load_examples(p)


def test_json_array_error_names_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[\n" + json.dumps(INSTR) + ",\n" + json.dumps(CHAT) + ",\n" + json.dumps({"bad": 1}) + "\n]\n")
    with pytest.raises(DataError, match=rf"{p}:4 \(record 2\)"):
        load_examples(p)


def test_all_formats_load_the_same(tmp_path):
    import datasets

    rows = [INSTR, {**INSTR, "output": "4", "input": ""}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hfdict"))
    loaded = [load_examples(tmp_path / n) for n in ("d.jsonl", "d.json", "d.parquet", "hf", "hfdict")]
    for other in loaded[1:]:
        assert [e.messages for e in other] == [e.messages for e in loaded[0]]
    assert loaded[0][1].messages[0]["content"] == "Add"  # empty input adds nothing


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        load_examples(tmp_path / "d.csv")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_invalid_utf8_names_file_line_and_column(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    good = json.dumps(INSTR).encode()
    body = good + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}' + b"\n"
    p.write_bytes(body if suffix == ".jsonl" else b"[" + good + b",\n" + body.split(b"\n")[1] + b"]")
    with pytest.raises(DataError, match=rf"{p}:2: not valid UTF-8 \(byte b'\\xe9' at column \d+\)"):
        load_examples(p)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_names_the_file_not_a_recursion_error(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    deep = "[" * 100_000 + "]" * 100_000
    p.write_text(json.dumps(INSTR) + "\n" + deep + "\n" if suffix == ".jsonl" else deep)
    with pytest.raises(DataError, match="nested too deeply") as err:
        load_examples(p)
    assert (
        f"{p}:2: JSON nested too deeply" in str(err.value) if suffix == ".jsonl" else str(err.value).startswith(str(p))
    )
