"""Render the configuration reference (docs/configuration.md) from the pydantic models themselves.

``python -m fedtune.config_reference > docs/configuration.md``; a test fails when the file is stale.
"""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel

from fedtune.config import ExperimentConfig
from fedtune.registry import ALL

HEADER = """# Configuration reference

Generated from `src/fedtune/config.py` by `python -m fedtune.config_reference`; do not edit by hand.

A config is a YAML file of the sections below; every key is optional and has the default shown.
Unknown keys and bad values are rejected before any work starts, naming the key and the allowed values.
Override any key from the command line with a dotted path and a YAML value:

```
fedtune run examples/quickstart.yaml federation.rounds=3 training.lr=5e-4 adapter.target_modules=[q_proj,v_proj]
```
"""


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        item = typing.get_args(annotation)[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "list of entries (below)"
        return f"list of {_type_name(item)}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(value: object) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    nested: list[tuple[str, type[BaseModel]]] = []
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((name, ann))
            continue
        item = typing.get_args(ann)[0] if typing.get_origin(ann) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):  # a list of entries: document one entry
            nested.append((f"{name}[]", item))
        if field.is_required():
            rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | (required) | {field.description or ''} |")
            continue
        default = field.get_default(call_default_factory=True)
        rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | {_default(default)} | {field.description or ''} |")
    if rows:
        title = prefix.rstrip(".") or "top level"
        out.append(f"\n## `{title}`\n")
        if model.__doc__ and prefix:
            out.append(model.__doc__.strip().splitlines()[0] + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(rows)
    for name, sub in nested:
        _section(sub, f"{prefix}{name}.", out)


def _plugins(out: list[str]) -> None:
    """One table per registry: what each name means and where its code lives."""
    out.append("\n## Plug-ins\n")
    out.append(
        "Every name a plug-in key accepts, from `src/fedtune/registry.py` (the config's allowed values come from it)."
    )
    for reg in ALL:
        out.append(f"\n### {reg.kind} (`{reg.key}`)\n")
        out.append("| name | what | code |\n|---|---|---|")
        out.extend(f"| `{e.name}` | {e.summary} | `{e.target}` |" for e in reg)


def render_reference() -> str:
    out = [HEADER]
    _section(ExperimentConfig, "", out)
    _plugins(out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
