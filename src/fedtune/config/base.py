"""The base of every config section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def changed_keys(section: BaseModel, default: BaseModel | None = None) -> list[str]:
    """Dotted keys of a config section whose values differ from the section's defaults (nested sections
    by key, e.g. ``builtin.public_per_task``)."""
    a, b = section.model_dump(), (default if default is not None else type(section)()).model_dump()
    out: list[str] = []

    def walk(x: object, y: object, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in x:
                walk(x[k], y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(prefix.rstrip("."))

    walk(a, b, "")
    return out
