"""Hand a run's final model to lm-evaluation-harness (``lm-eval``) for the tasks whose data the user has.

The run's final adapter is folded into its base (``adapters.merge``) and written, with the tokenizer,
to a scratch folder inside the run directory, which ``lm_eval.simple_evaluate`` loads as a plain
Hugging Face model (``model="hf"``); with ``base`` the base model is written and scored the same way
for comparison. Tasks come from ``include_path`` (YAML task files, e.g. ``dataset_path: json`` with
``data_files`` naming local files) and, when a name is not found there, from lm-eval's own registry
(whose sets need the hub or a filled ``HF_DATASETS_CACHE``). Where the hub cannot be reached, the
harness runs offline: nothing is fetched, and a task whose data is not local fails naming itself. The
results go to ``RUN_DIR/lm_eval.json``; the scratch folder is removed afterwards.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.core.errors import ConfigError, FedtuneError

INSTALL = "pip install 'fedtune[lm-eval]'"


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise FedtuneError(f"fedtune lm-eval needs lm-evaluation-harness ({exc.name} is missing): {INSTALL}") from None
    return lm_eval, TaskManager


def task_manager(tasks: Sequence[str], include_path: Path | None) -> Any:
    """lm-eval's TaskManager holding ``tasks``: the user's folder alone when it has them all (quick), else with
    lm-eval's own registry too; ConfigError naming the tasks neither has."""
    _, TaskManager = _lm_eval()
    if include_path is not None and not include_path.is_dir():
        raise ConfigError(f"--include-path {include_path}: no such folder (it should hold lm-eval task YAML files)")
    path = None if include_path is None else str(include_path)
    if path is not None:
        own = TaskManager(include_path=path, include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    manager = TaskManager(include_path=path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f"in {include_path} or " if include_path else ""
        raise ConfigError(
            f"lm-eval knows no task {', '.join(missing)} {where}in its registry: give --include-path DIR with a YAML "
            "task file for each (task: NAME, dataset_path: json, dataset_kwargs: {data_files: {test: FILE}}, ...)"
        )
    return manager


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` as {task: {"metric,filter": value}}, numbers only (stderr "N/A" and aliases dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        out[task] = {
            k: float(v)
            for k, v in values.items()
            if "," in k and isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars too
        }
    return out


def evaluate_run(
    run_dir: Path,
    tasks: Sequence[str],
    include_path: Path | None = None,
    adapter: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    base: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Score the run's final model (and with ``base`` its base model) on ``tasks``; write and return the report."""
    from fedtune.adapters.merge import adapter_folder, merged_model, save_merged
    from fedtune.config import load_config
    from fedtune.models.loading import hub_reachable, load_model

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FedtuneError(f"{config} does not exist; is {run_dir} a fedtune run directory?")
    if not tasks:
        raise ConfigError("--tasks: name at least one lm-eval task")
    lm_eval, _ = _lm_eval()
    if not hub_reachable():
        _offline()
    manager = task_manager(tasks, include_path)
    cfg = load_config(config)
    folder = adapter_folder(run_dir / "final_adapter", adapter)
    m = cfg.model
    scratch = Path(tempfile.mkdtemp(prefix=".lm-eval-", dir=run_dir))
    try:
        loaded = load_model(m.name, m.dtype, m.revision, m.gguf_file, m.trust_remote_code)
        models = {}
        if base:
            save_merged(loaded.model, loaded.tokenizer, scratch / "base")
            models["base"] = scratch / "base"
        save_merged(merged_model(loaded.model, folder), loaded.tokenizer, scratch / "final")
        models["final"] = scratch / "final"
        del loaded  # the harness loads its own copy
        device = device or ("cuda" if _cuda() else "cpu")
        report: dict[str, Any] = {
            "tasks": list(tasks),
            "include_path": None if include_path is None else str(include_path),
            "limit": limit,
            "num_fewshot": num_fewshot,
            "adapter": folder.name if adapter else None,
            "lm_eval_version": _version(),
            "scores": {},
        }
        for name, path in models.items():
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(path), "dtype": m.dtype},
                tasks=list(tasks),
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
                device=device,
                log_samples=False,
                bootstrap_iters=0,
            )
            report["scores"][name] = scores(out["results"])
        (run_dir / "lm_eval.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _offline() -> None:
    """No hub: tell huggingface_hub, datasets and transformers not to try (each reads these when asked)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
