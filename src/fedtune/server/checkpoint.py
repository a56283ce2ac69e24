"""Atomic per-round checkpoints of the whole server state.

A checkpoint is a directory ``checkpoints/round_NNNN`` holding the global adapter, the
paradigm's algorithm state (e.g. the aggregator's), simulated clients' state, downlink replicas
and ``state.json`` (round, metrics history, checksums). It is written in a
temporary directory, fsynced, and renamed into place, so a kill at any moment leaves either
the complete new checkpoint or none; loading picks the newest directory whose checksums verify.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from fedtune.core.errors import RunError
from fedtune.core.types import ClientState, Params, ServerState, flatten_state, unflatten_state

log = logging.getLogger(__name__)
_ROUND_DIR = re.compile(r"round_(\d+)")

_PARAMS, _AGG, _CLIENTS, _STATE = "params.safetensors", "aggregator.safetensors", "clients.safetensors", "state.json"
_REPLICAS = "replicas.safetensors"


def checkpoint_dir(run_dir: Path, round_index: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_index:04d}"


def save_checkpoint(run_dir: Path, state: ServerState, keep: int | None = None) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, state.round)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        agg_tensors, agg_scalars = state_to_tensors(state.algorithm)
        save_file({k: v.contiguous() for k, v in state.params.items()}, tmp / _PARAMS)
        save_file({k: v.contiguous() for k, v in agg_tensors.items()}, tmp / _AGG)
        clients = {
            f"{cid}|{k}": v.contiguous() for cid, st in state.clients.items() for k, v in flatten_state(st).items()
        }
        save_file(clients, tmp / _CLIENTS)
        unique, replica_of = _dedupe(state.replicas)
        save_file({f"{j}|{k}": v.contiguous() for j, r in enumerate(unique) for k, v in r.items()}, tmp / _REPLICAS)
        meta = {
            "round": state.round,
            "aggregator": state_signature(state.algorithm),
            "aggregator_scalars": agg_scalars,
            "history": state.history,
            "replica_of": replica_of,
            "sha256": {name: _sha256(tmp / name) for name in (_PARAMS, _AGG, _CLIENTS, _REPLICAS)},
        }
        (tmp / _STATE).write_text(json.dumps(meta, indent=1))
        for name in (_PARAMS, _AGG, _CLIENTS, _REPLICAS, _STATE):
            _fsync(tmp / name)
        if final.exists():  # a stale copy of this round (e.g. from an earlier attempt)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_atomic(root / "LATEST", final.name + "\n")
    if keep is not None:
        for old in _round_dirs(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: Path, algorithm_template: NamedTuple) -> ServerState | None:
    """Newest checkpoint that verifies, or None when there is none; corrupt or partial ones are
    skipped with a warning. Round directories none of which loads raise ``RunError``: starting over
    would overwrite the run's metrics with nothing."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a write that was killed before its rename
    failures: list[str] = []
    for path in _round_dirs(root):
        try:
            return load_checkpoint(path, algorithm_template)
        except Exception as exc:  # a damaged directory must not stop a resume from an older one
            log.warning("skipping checkpoint %s: %s", path, exc)
            failures.append(f"{path.name}: {exc}")
    if failures:
        raise RunError(
            f"cannot resume {run_dir}: none of its {len(failures)} checkpoints loads ({'; '.join(failures)}). "
            "Nothing was changed; repair or remove them, or start a new run with output.name=<new name>"
        )
    return None


def load_checkpoint(path: Path, algorithm_template: NamedTuple) -> ServerState:
    meta = json.loads((path / _STATE).read_text())
    for name, digest in meta["sha256"].items():
        if _sha256(path / name) != digest:
            raise ValueError(f"{path / name} does not match its checksum")
    signature, agg_tensors, scalars = _upgraded(meta["aggregator"], load_file(path / _AGG), meta["aggregator_scalars"])
    if signature != state_signature(algorithm_template):
        raise ValueError(
            f"checkpoint holds {meta['aggregator']} state but the config's algorithm uses "
            f"{state_signature(algorithm_template)}; resume with the same paradigm and aggregation settings"
        )
    agg = state_from_tensors(algorithm_template, agg_tensors, scalars)
    flat: dict[int, Params] = {}
    for name, t in load_file(path / _CLIENTS).items():
        cid, _, key = name.partition("|")
        flat.setdefault(int(cid), {})[key] = t
    clients: dict[int, ClientState] = {cid: unflatten_state(f) for cid, f in flat.items()}
    replicas: dict[int, Params] = {}
    if "replica_of" in meta:  # checkpoints written before downlink updates existed have none
        unique: dict[int, Params] = {}
        for flat, t in load_file(path / _REPLICAS).items():
            j, _, key = flat.partition("|")
            unique.setdefault(int(j), {})[key] = t
        replicas = {int(c): unique[j] for c, j in meta["replica_of"].items()}  # shared again, as saved
    return ServerState(meta["round"], load_file(path / _PARAMS), agg, meta["history"], clients, replicas)


def _upgraded(
    signature: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """An aggregator state written by an earlier layout, in today's: DP-FedAvg's ``DpFedAvgState(optimizer,
    dp, last_clip_norm)`` is the pipeline's ``PipelineState(optimizer, rounds, combine=DpState)`` now."""
    if "DpFedAvgState(" not in signature:
        return signature, tensors, scalars
    out = dict(scalars)
    for key in [k for k in scalars if k.endswith("dp.noise_seed")]:
        at = key[: -len("dp.noise_seed")]  # where the DpFedAvgState sat (a wrapper's "inner." before it)
        for name in [k for k in scalars if k.startswith(f"{at}dp.")]:
            out[f"{at}combine.{name[len(at) + 3 :]}"] = out.pop(name)
        out[f"{at}combine.last_clip_norm"] = out.pop(f"{at}last_clip_norm")
        out[f"{at}rounds"] = out[f"{at}combine.rounds"]
    return signature.replace("DpFedAvgState(", "PipelineState("), tensors, out


def _dedupe(replicas: dict[int, Params]) -> tuple[list[Params], dict[str, int]]:
    """Distinct replica objects (clients that took part in the same rounds share one) and client -> index."""
    index: dict[int, int] = {}
    unique: list[Params] = []
    replica_of: dict[str, int] = {}
    for c in sorted(replicas):
        r = replicas[c]
        if id(r) not in index:
            index[id(r)] = len(unique)
            unique.append(r)
        replica_of[str(c)] = index[id(r)]
    return unique, replica_of


def recorded_history(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics records of the newest checkpoint whose record reads ([] if none): what a resumed run
    goes on from (``load_latest`` also verifies the tensors; this reads the record alone)."""
    for path in _round_dirs(run_dir / "checkpoints"):
        try:
            return list(json.loads((path / _STATE).read_text())["history"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return []


def _round_dirs(root: Path) -> list[Path]:
    """round_N directories, newest first by round number (round_10000 is newer than round_9999)."""
    rounds = {p: _ROUND_DIR.fullmatch(p.name) for p in root.glob("round_*") if p.is_dir()}
    return sorted((p for p, m in rounds.items() if m), key=lambda p: int(rounds[p][1]), reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def state_signature(state: NamedTuple) -> str:
    """The nested state types, e.g. 'PipelineState(AdaptiveState)': what a checkpoint must match."""
    inner = [state_signature(v) for v in state if hasattr(v, "_asdict")]
    return type(state).__name__ + (f"({', '.join(inner)})" if inner else "")


def state_to_tensors(state: NamedTuple, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten a NamedTuple state: tensors (and dicts of tensors) to a flat dict, scalars to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, value in state._asdict().items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict):
            tensors.update({f"{key}/{k}": v for k, v in value.items()})
        elif hasattr(value, "_asdict"):
            t, s = state_to_tensors(value, f"{key}.")
            tensors.update(t)
            scalars.update(s)
        else:
            scalars[key] = value
    return tensors, scalars


def state_from_tensors(
    template: NamedTuple, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], prefix: str = ""
) -> NamedTuple:
    """Inverse of state_to_tensors, shaped by a template (``aggregator.init(params)``)."""
    values = {}
    for name, value in template._asdict().items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            values[name] = tensors[key]
        elif isinstance(value, dict):
            values[name] = {k: tensors[f"{key}/{k}"] for k in value}
        elif hasattr(value, "_asdict"):
            values[name] = state_from_tensors(value, tensors, scalars, f"{key}.")
        else:  # a scalar a later layout added (e.g. an empty stage's None) takes the template's initial value
            values[name] = scalars.get(key, value)
    return type(template)(**values)
