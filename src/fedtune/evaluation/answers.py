"""Reading a model's answer out of its text: final numbers (GSM8K), code blocks (code tasks).

GSM8K's references end in ``#### <number>``; a generation is read the same way when it has that
marker, else by its last number (the rule FS-LLM and lm-eval's flexible match apply). Numbers compare
by value after dropping thousands separators and a currency sign: "1,200" equals "1200.0".
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_FENCE = re.compile(r"```[ \t]*(?:[A-Za-z0-9_+-]+)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def final_number(text: str) -> str | None:
    """The number after the last ``####``, if there is one; else the last number in ``text``; else None."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        return _clean(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _clean(found[-1]) if found else None


def _clean(number: str) -> str:
    return number.replace(",", "").replace("$", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def code_of(text: str) -> str:
    """The first fenced code block's body (```python ... ```, an unclosed one runs to the end), else the text."""
    match = _FENCE.search(text)
    return match.group(1) if match else text
