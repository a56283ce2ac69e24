"""The base of every config section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def changed_keys(section: BaseModel, default: BaseModel) -> list[str]:
    """Keys of a config section whose values differ from the section's defaults."""
    a, b = section.model_dump(), default.model_dump()
    return [k for k in a if a[k] != b[k]]
