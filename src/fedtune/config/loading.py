"""Reading a config: YAML, dotted ``key=value`` overrides, validation with errors that name the key, resolution.

A config is YAML; ``key=value`` overrides use dotted paths (``federation.rounds=5``) and YAML
values (``training.lr=2e-4``, ``adapter.target_modules=[q_proj,v_proj]``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedtune.config.experiment import DEFAULT_PARADIGM, ExperimentConfig, paradigm_of
from fedtune.config.resolve import resolve
from fedtune.core.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML, apply ``key=value`` overrides, validate; raise ConfigError naming the bad key."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        _name_as_mapping(raw)
        apply_override(raw, item)
    return validate_config(raw, source)


def _name_as_mapping(raw: dict[str, Any]) -> None:
    """``paradigm: kd`` as ``paradigm: {name: kd}``, so that ``paradigm.top_k=4`` can be set over it."""
    if isinstance(raw.get("paradigm"), str):
        raw["paradigm"] = {"name": raw["paradigm"]}


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. federation.rounds=5)")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    set_dotted(raw, key, value, f"override {item!r}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, what: str, merge: bool = False) -> None:
    """Set ``raw[a][b][c] = value`` for ``key`` "a.b.c"; with ``merge``, a mapping value is set key by key
    into an existing section instead of replacing it. ``what`` names the setting in errors."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{what}: empty key segment in {key!r}")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    if merge and isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for k, v in value.items():
            set_dotted(node[parts[-1]], str(k), v, what, merge)
        return
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """The validated, resolved config (``config.resolve``), or ConfigError naming each bad key."""
    try:
        return resolve(ExperimentConfig.model_validate(raw))
    except ValidationError as exc:
        lines = [_describe(err, raw) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{key}'.{hint} Allowed keys here: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and not loc:
        return msg
    return f"'{key}': {msg} (got {err.get('input')!r})"


def _allowed_keys(loc: list[str], raw: dict[str, Any]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for i, part in enumerate(loc):
        if i == 0 and part == "paradigm":  # its model is the one its name picks
            chosen = raw.get("paradigm")
            name = chosen.get("name", DEFAULT_PARADIGM) if isinstance(chosen, dict) else DEFAULT_PARADIGM
            try:
                model = paradigm_of(name).settings
            except ValueError:
                return []
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out[prefix.rstrip(".")] = (x, y)

    walk(a.model_dump(mode="json"), b.model_dump(mode="json"), "")
    return out
