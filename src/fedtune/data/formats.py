"""Read instruction data from JSONL / JSON / Parquet / a saved HF dataset into Examples.

Three record shapes are accepted:
  instruction: {"instruction": str, "input": str (optional), "output": str, ...extra fields}
  chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], ...}
  preference:  {"prompt": str or messages, "chosen": str or messages, "rejected": str or messages, ...}
The last chat message must come from the assistant: it is the training target. A preference pair is
the prompt with its chosen reply as the target and the rejected reply beside it (``Example.rejected``);
its replies may be whole conversations (UltraFeedback's), whose turns before the reply are the prompt. Extra scalar
fields (e.g. ``task``, ``category``) are kept as metadata for partitioning and reporting. A public
set in its own columns is read through its recipe (``data.recipes``). Every malformed record is found
in one pass: one DataError names the file, the line (or record index) and what was expected for each
(up to ``SHOWN``), or with ``on_error="skip"`` they are dropped and counted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.errors import DataError

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
SHOWN = 20  # bad records listed in one error
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: a dataset id on the hub
_SHAPES = (
    "expected either 'messages' (a list of {role, content}) or 'instruction' and 'output' "
    "strings (with an optional 'input')"
)


@dataclass(frozen=True)
class Example:
    """One training example: chat turns whose last turn (assistant) is the target."""

    messages: tuple[dict[str, str], ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    rejected: str | None = None  # a preference pair's dispreferred reply to the same prompt (target: the chosen)

    @property
    def target(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages[:-1]]


def scalar_fields(record: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record's scalar fields (strings, numbers, booleans, nulls) but ``exclude``: an example's metadata."""
    return {
        k: v for k, v in record.items() if k not in exclude and (isinstance(v, (str, int, float, bool)) or v is None)
    }


def from_instruction(instruction: str, output: str, input: str = "", **meta: Any) -> Example:
    user = f"{instruction}\n\n{input}" if input else instruction
    return Example(({"role": "user", "content": user}, {"role": "assistant", "content": output}), meta)


def record_to_example(record: Any, where: str) -> Example:
    """Validate one record; ``where`` is 'file:line' or 'file: record N' for the error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, {_SHAPES}")
    if "chosen" in record or "rejected" in record:
        return preference_example(record, where)
    meta = scalar_fields(record, ("messages", "instruction", "input", "output"))
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


_PAIR = "expected a preference pair {prompt, chosen, rejected}: strings, or lists of {role, content} messages"


def preference_example(record: dict[str, Any], where: str) -> Example:
    """A preference pair {prompt, chosen, rejected} as an Example: the prompt's turns, the chosen reply as the
    target and the rejected one beside it. A reply may be a string, a list ending in the assistant's message
    (trl's conversational shape), or the whole conversation (UltraFeedback's), whose earlier turns are then
    the prompt and must match the other reply's and a string ``prompt``."""
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise DataError(f"{where}: {_PAIR}; this record has keys {sorted(record)} (missing {missing})")
    chosen_turns, chosen = _reply(record["chosen"], "chosen", where)
    rejected_turns, rejected = _reply(record["rejected"], "rejected", where)
    if chosen_turns != rejected_turns:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' continue different conversations; their turns before "
            "the reply must be the same"
        )
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
        turns = chosen_turns or ({"role": "user", "content": prompt},)
        if chosen_turns and not any(m["role"] == "user" and m["content"] == prompt for m in chosen_turns):
            raise DataError(f"{where}: 'prompt' is not among the user turns that 'chosen' replies to")
    elif isinstance(prompt, list):
        if not prompt:
            raise DataError(f"{where}: 'prompt' is an empty list; a pair needs the turns its replies answer")
        turns = _check_messages([*prompt, {"role": "assistant", "content": ""}], where)[:-1]
        if chosen_turns and chosen_turns != turns:
            raise DataError(f"{where}: 'chosen' replies to other turns than 'prompt' holds")
    elif prompt is None and chosen_turns:
        turns = chosen_turns
    else:
        raise DataError(
            f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, got {type(prompt).__name__}"
        )
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply; a pair must prefer one of two")
    meta = scalar_fields(record, ("prompt", "chosen", "rejected", "messages"))
    return Example((*turns, {"role": "assistant", "content": chosen}), meta, rejected)


def _reply(value: Any, key: str, where: str) -> tuple[tuple[dict[str, str], ...], str]:
    """(the turns a reply follows, the reply's text) of a preference pair's ``key``."""
    if isinstance(value, str):
        turns: tuple[dict[str, str], ...] = ()
        text = value
    elif isinstance(value, list) and value:
        messages = _check_messages(value, where, key, need_prompt=False)
        turns, text = messages[:-1], messages[-1]["content"]
    else:
        raise DataError(
            f"{where}: {key!r} must be a string or a non-empty list of {{role, content}} messages, "
            f"got {type(value).__name__}: {value!r:.60}"
        )
    if not text.strip():
        raise DataError(f"{where}: {key!r} is empty; a pair needs two non-empty replies")
    return turns, text


def _check_messages(
    messages: Any, where: str, key: str = "messages", need_prompt: bool = True
) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role is {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message{'' if key == 'messages' else f' of {key!r}'} must be the assistant's (the "
            f"training target), got {out[-1]['role']!r}"
        )
    if need_prompt and len(out) < 2:
        raise DataError(f"{where}: 'messages' needs at least one prompt turn before the assistant's reply")
    return tuple(out)


def load_examples(path: str | Path, recipe: Any = None, on_error: str = "raise") -> list[Example]:
    """Every record of a local data file, saved HF dataset directory or (hub reachable) HF dataset id as an
    Example: fedtune's shapes, or ``recipe``'s (``data.recipes.Recipe``) mapping of a public set's columns."""
    convert = record_to_example if recipe is None else recipe.example
    if convert is None:
        raise DataError(f"dataset recipe {recipe.name!r} gives evaluation items, not training examples")
    grouped = recipe is not None and recipe.grouped_file
    return collect(read_rows(path, grouped=grouped), convert, str(path), on_error)


def read_rows(path: str | Path, split: str = "train", grouped: bool = False) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of ``path``; an unreadable line gives (where, DataError) and reading
    goes on. ``grouped``: a .json file is one object {group: [records]}, each record given ``client: group``."""
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_ID.fullmatch(str(path)):
            return _hub_rows(str(path), split)
        raise DataError(f"data file {p} does not exist (data.dataset / data.eval_dataset); check the path")
    if p.is_dir():
        return _hf_rows(p)
    if p.suffix == ".jsonl":
        return _jsonl_rows(p)
    if p.suffix == ".json":
        return _grouped_rows(p) if grouped else _json_rows(p)
    if p.suffix == ".parquet":
        return _parquet_rows(p)
    raise DataError(f"{p}: unknown data format {p.suffix!r}; use .jsonl, .json, .parquet or a saved HF dataset dir")


def collect(rows: Iterable[tuple[str, Any]], convert, source: str, on_error: str = "raise", cap: int = SHOWN) -> list:
    """``convert(record, where)`` of every row. Bad rows are all found in one pass: ``on_error="raise"``
    raises one DataError listing the first ``cap`` of them and their count; ``"skip"`` drops them, logging
    the count and the first reasons. No good row at all is an error either way."""
    out, bad, seen = [], [], 0
    for where, record in rows:
        seen += 1
        try:
            if isinstance(record, DataError):
                raise record
            out.append(convert(record, where))
        except DataError as exc:
            bad.append(str(exc))
    if bad and on_error != "skip":
        listed = "\n  ".join(bad[:cap])
        more = f"\n  ... and {len(bad) - cap} more" if len(bad) > cap else ""
        raise DataError(
            f"{source}: {len(bad)} of {seen} records are bad (data.on_error: skip drops them):\n  {listed}{more}"
        )
    if bad:
        log.warning(
            "%s: skipped %d of %d records (data.on_error: skip); first: %s", source, len(bad), seen, "; ".join(bad[:3])
        )
    if not out:
        raise DataError(f"{source}: no records found" if not seen else f"{source}: every one of {seen} records is bad")
    return out


def _jsonl_rows(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = _utf8(raw, p, lineno)
                if line.strip():
                    yield f"{p}:{lineno}", _parse_json(line, p, lineno)
            except DataError as exc:
                yield f"{p}:{lineno}", exc


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


def _grouped_rows(p: Path) -> Iterator[tuple[str, Any]]:
    data = _parse_json(_utf8(p.read_bytes(), p, None), p, None)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"{p}: expected one object {{client: [records, ...]}} (FedLLM-Bench's layout)")
    for group, records in data.items():
        for i, rec in enumerate(records):
            yield f"{p}: {group!r} record {i}", {**rec, "client": group} if isinstance(rec, dict) else rec


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    from fedtune.models.loading import hub_reachable

    try:
        if not hub_reachable():
            raise OSError("the hub is out of reach from this machine")
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"{name}: not a local path, and loading it from the Hugging Face hub failed ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Where the hub is out of reach, save a copy elsewhere with "
            f"datasets.load_dataset({name!r}, split={split!r}).save_to_disk(DIR) (or as Parquet/JSONL) and give DIR"
        ) from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}]: row {i}", rec


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


def _record(ex: Example) -> dict[str, Any]:
    """An example as the record ``record_to_example`` reads back equal: chat, or a conversational pair."""
    if ex.rejected is None:
        return {"messages": [dict(m) for m in ex.messages], **ex.meta}
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return {"prompt": ex.prompt_messages, "chosen": reply(ex.target), "rejected": reply(ex.rejected), **ex.meta}


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write examples as chat records (metadata kept) that ``load_examples`` reads back equal; returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(_record(ex), ensure_ascii=False) + "\n")
            n += 1
    return n
