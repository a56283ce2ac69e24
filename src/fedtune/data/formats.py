"""Read instruction data from JSONL / JSON / Parquet / a saved HF dataset into Examples.

Two record shapes are accepted:
  instruction: {"instruction": str, "input": str (optional), "output": str, ...extra fields}
  chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], ...}
The last chat message must come from the assistant: it is the training target. Extra scalar
fields (e.g. ``task``, ``category``) are kept as metadata for partitioning and reporting.
A malformed record raises DataError naming the file, the line (or record index) and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.errors import DataError

ROLES = ("system", "user", "assistant")
_SHAPES = (
    "expected either 'messages' (a list of {role, content}) or 'instruction' and 'output' "
    "strings (with an optional 'input')"
)


@dataclass(frozen=True)
class Example:
    """One training example: chat turns whose last turn (assistant) is the target."""

    messages: tuple[dict[str, str], ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def target(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages[:-1]]


def from_instruction(instruction: str, output: str, input: str = "", **meta: Any) -> Example:
    user = f"{instruction}\n\n{input}" if input else instruction
    return Example(({"role": "user", "content": user}, {"role": "assistant", "content": output}), meta)


def record_to_example(record: Any, where: str) -> Example:
    """Validate one record; ``where`` is 'file:line' or 'file: record N' for the error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, {_SHAPES}")
    meta = {k: v for k, v in record.items() if k not in ("messages", "instruction", "input", "output")}
    meta = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if "messages" in record:
        return Example(_check_messages(record["messages"], where), meta)
    if "instruction" in record and "output" in record:
        for key in ("instruction", "output", "input"):
            value = record.get(key, "")
            if value is None and key == "input":
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}: {value!r:.60}")
        if not record["output"].strip():
            raise DataError(f"{where}: 'output' is empty; every example needs a non-empty target")
        return from_instruction(record["instruction"], record["output"], record.get("input") or "", **meta)
    missing = [k for k in ("instruction", "output") if k not in record]
    raise DataError(f"{where}: {_SHAPES}; this record has keys {sorted(record)} (missing {missing})")


def _check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's (the training target), got {out[-1]['role']!r}"
        )
    if len(out) < 2:
        raise DataError(f"{where}: 'messages' needs at least one prompt turn before the assistant's reply")
    return tuple(out)


def load_examples(path: str | Path) -> list[Example]:
    """Load every record of a local data file or saved HF dataset directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist (data.dataset / data.eval_dataset); check the path")
    if p.is_dir():
        rows: Iterable[tuple[str, Any]] = _hf_rows(p)
    elif p.suffix == ".jsonl":
        rows = _jsonl_rows(p)
    elif p.suffix == ".json":
        rows = _json_rows(p)
    elif p.suffix == ".parquet":
        rows = _parquet_rows(p)
    else:
        raise DataError(f"{p}: unknown data format {p.suffix!r}; use .jsonl, .json, .parquet or a saved HF dataset dir")
    examples = [record_to_example(rec, where) for where, rec in rows]
    if not examples:
        raise DataError(f"{p}: no records found")
    return examples


def _jsonl_rows(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, p, lineno)
            if line.strip():
                yield f"{p}:{lineno}", _parse_json(line, p, lineno)


def _json_rows(p: Path) -> Iterator[tuple[str, Any]]:
    text = _utf8(p.read_bytes(), p, None)
    data = _parse_json(text, p, None)
    if not isinstance(data, list):
        raise DataError(f"{p}: a .json data file must hold a list of records, got {type(data).__name__}")
    # parsed arrays keep no line numbers: walk the text once to find where each record starts
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    for i, rec in enumerate(data):
        while text[pos] in " \t\r\n,":
            pos += 1
        line = text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
        yield f"{p}:{line} (record {i})", rec


def _utf8(raw: bytes, p: Path, lineno: int | None) -> str:
    """``raw`` decoded, or DataError naming the file, line and column of the first bad byte
    (``lineno`` None: ``raw`` is the whole file, and the line is counted)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lineno if lineno is not None else raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{p}:{line}: not valid UTF-8 (byte {raw[exc.start : exc.start + 1]!r} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _parse_json(text: str, p: Path, lineno: int | None) -> Any:
    """json.loads with errors that name the file and line (``lineno`` None: a whole .json file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = exc.lineno if lineno is None else lineno
        raise DataError(f"{p}:{line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        where = p if lineno is None else f"{p}:{lineno}"
        raise DataError(f"{where}: JSON nested too deeply to be a data record") from None


def _parquet_rows(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as exc:
        raise DataError(f"{p}: cannot read as Parquet: {exc}") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{p}: row {i}", rec


def _hf_rows(p: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:
        raise DataError(f"{p}: a directory must be a dataset saved with save_to_disk(): {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: saved DatasetDict has splits {list(ds)}, expected a 'train' split")
        ds = ds["train"]
    for i, rec in enumerate(ds):
        yield f"{p}: row {i}", rec


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write examples as chat records (metadata kept) that ``load_examples`` reads back equal; returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"messages": [dict(m) for m in ex.messages], **ex.meta}, ensure_ascii=False) + "\n")
            n += 1
    return n
