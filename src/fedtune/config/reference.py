"""Render the configuration reference (docs/configuration.md) from the pydantic models themselves.

``python -m fedtune.config.reference > docs/configuration.md``; a test fails when the file is stale.
"""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel

from fedtune.config.experiment import ExperimentConfig, paradigm_of
from fedtune.core.registry import ALL, PARADIGMS

HEADER = """# Configuration reference

Generated from the config models (`src/fedtune/config/`, and each paradigm's settings in
`src/fedtune/paradigms/NAME/settings.py`) by `python -m fedtune.config.reference`; do not edit by hand.

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


def _section(model: type[BaseModel], prefix: str, out: list[str], title: str | None = None) -> None:
    nested: list[tuple[str, type[BaseModel]]] = []
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if prefix == "" and name == "paradigm":  # its settings depend on its name: one section per paradigm
            rows.append(f"| `paradigm` | mapping or name | `{{name: parameter_sharing}}` | {field.description} |")
            continue
        if prefix == "paradigm." and name == "name":  # the section's heading says it
            continue
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
        title = title or prefix.rstrip(".") or "top level"
        out.append(f"\n## `{title}`\n")
        if model.__doc__ and prefix:
            out.append(model.__doc__.strip().splitlines()[0] + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(rows)
    for name, sub in nested:
        _section(sub, f"{prefix}{name}.", out)


def _paradigms(out: list[str]) -> None:
    """One section per paradigm: what it is, what it supports, its own settings under ``paradigm.``."""
    for entry in PARADIGMS:
        plugin = paradigm_of(entry.name)
        caps = plugin.capabilities
        supports = [k for k, v in vars(caps).items() if v is True]
        out.append(f"\n## `paradigm: {{name: {plugin.name}}}`\n")
        out.append(f"{plugin.summary[0].upper()}{plugin.summary[1:]} ({plugin.docs}).\n")
        reads = ", ".join(f"`{r}`" for r in plugin.reads)
        options = ", ".join(supports) or "none of the options"
        out.append(f"Reads {reads}; supports {options}; runs on {', '.join(caps.runtimes)}.\n")
        rows: list[str] = []
        _section(plugin.settings, "paradigm.", rows, title=f"paradigm: {plugin.name}")
        out.extend(line for line in rows if not line.startswith("\n## "))


def _plugins(out: list[str]) -> None:
    """One table per registry: what each name means and where its code lives."""
    out.append("\n## Plug-ins\n")
    out.append(
        "Every name a plug-in key accepts, from `src/fedtune/core/registry.py` (the config's allowed values come "
        "from it)."
    )
    for reg in ALL:
        out.append(f"\n### {reg.kind} (`{reg.key}`)\n")
        out.append("| name | what | code |\n|---|---|---|")
        for e in reg:
            summary = e.summary or paradigm_of(e.name).summary if reg is PARADIGMS else e.summary
            out.append(f"| `{e.name}` | {summary} | `{e.target}` |")


def render_reference() -> str:
    out = [HEADER]
    _section(ExperimentConfig, "", out)
    _paradigms(out)
    _plugins(out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
