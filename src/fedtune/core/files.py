"""Files written so that a reader never sees half of them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary folder beside ``target``, then put it in ``target``'s place (replacing
    an earlier one): the folder is whole or absent, never half written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def flatten(table: dict, sep: str = ".", prefix: str = "") -> dict:
    """A nested mapping as one level, keys joined by ``sep``: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= flatten(value, sep, f"{prefix}{key}{sep}")
        else:
            out[f"{prefix}{key}"] = value
    return out
