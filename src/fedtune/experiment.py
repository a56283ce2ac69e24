"""The recipe, top to bottom: set up the run directory, data, model and clients; run rounds; export.

``run_experiment`` is what ``fedtune run`` calls; it is also the Python entry point.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.aggregation import build_aggregator
from fedtune.assembly import build_client_data, build_workbench, make_handler
from fedtune.config import ExperimentConfig, config_diff, to_yaml, validate_config
from fedtune.data.prepare import FederatedData, prepare_federated_data
from fedtune.errors import ConfigError, FedtuneError
from fedtune.evaluation.harness import EvalSet, evaluate
from fedtune.reporting.console import TqdmHandler, console, round_line, rounds_table, summary_table
from fedtune.reporting.metrics import MetricsWriter, summarize
from fedtune.runtime import build_runtime
from fedtune.runtime.base import Runtime
from fedtune.server.checkpoint import ServerState, load_latest, save_checkpoint
from fedtune.server.downlink import ReplicaDownlink
from fedtune.server.round_loop import LoopSettings, run_rounds
from fedtune.types import Params

log = logging.getLogger("fedtune")

# keys that may change when resuming; anything else would make the resumed run a different experiment
RESUMABLE_CHANGES = ("federation.rounds", "evaluation.", "output.progress", "output.keep_checkpoints")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    state: ServerState


def resolve_run_dir(cfg: ExperimentConfig, config_path: Path | None) -> Path:
    name = cfg.output.name or (config_path.stem if config_path else "run")
    return Path(cfg.output.dir) / name


def run_experiment(
    cfg: ExperimentConfig,
    config_path: Path | None = None,
    resume: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
) -> RunResult:
    """Run (or with resume=True continue) one experiment; on_record sees each round's metrics once written.

    ``runtime``: where client messages go; default the one cfg.runtime names (deployment passes its own).
    """
    if runtime is None and cfg.runtime.name == "flower":
        raise ConfigError(
            "runtime.name=flower is a deployment: start the coordinator with `fedtune server CONFIG` and each "
            "client with `fedtune client CONFIG --data PATH --key KEY` (see docs/deployment.md)"
        )
    run_dir = resolve_run_dir(cfg, config_path)
    check_run_dir(run_dir, cfg, resume)
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.seed)  # data errors leave no run dir behind
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    _setup_logging(run_dir)
    log.info("run directory: %s", run_dir)
    try:
        return _run(cfg, run_dir, data, resume, on_record, runtime)
    except FedtuneError as exc:
        log.error("%s", exc, extra={"file_only": True})  # the CLI prints it; run.log keeps it too
        raise
    except KeyboardInterrupt:
        log.error("interrupted; the last complete round is checkpointed: continue with --resume")
        raise


def _run(
    cfg: ExperimentConfig,
    run_dir: Path,
    data: FederatedData,
    resume: bool,
    on_record: Callable[[dict[str, Any]], None] | None,
    runtime: Runtime | None,
) -> RunResult:
    bench = build_workbench(cfg)
    adapter, tokenizer, eval_settings = bench.adapter, bench.tokenizer, bench.eval_settings
    lora_mode = cfg.aggregation.lora_mode() if cfg.adapter.is_lora() else None
    clients = build_client_data(data, bench.encoder, cfg)
    eval_set = EvalSet.build(_eval_subset(data.eval, cfg.evaluation.max_samples), bench.encoder)
    log.info(
        "%d clients, %s training examples; %d held-out examples; template %s",
        len(clients),
        "/".join(str(len(c.train)) for c in clients.values()),
        len(eval_set.examples),
        bench.encoder.template,
    )
    comp = cfg.compression
    uplink, downlink, initial = bench.uplink, bench.downlink, bench.initial
    if comp.uplink or comp.downlink:
        log.info(
            "compression: uplink %s; downlink %s%s",
            uplink.describe(),
            downlink.describe(),
            " (updates to each client's replica)" if comp.downlink_updates else "",
        )
    runtime = runtime or build_runtime(cfg, lambda: make_handler(cfg, bench, clients))
    lower = {c: r for c in range(cfg.partition.num_clients) if (r := cfg.adapter.rank_of_client(c)) != cfg.adapter.r}
    lora_alpha = cfg.adapter.alpha if cfg.adapter.is_lora() else None  # LoRA-aware aggregation for LoRA only
    # with downlink updates clients hold the previous factors, so exact mode must not re-parametrise them
    align = cfg.compression.downlink_updates
    aggregator = build_aggregator(cfg.aggregation, cfg.partition.num_clients, lora_alpha, lower or None, align)
    log.info(
        "aggregation: %s%s%s",
        aggregator.name,
        f", LoRA {lora_mode}" if lora_mode else f", {cfg.adapter.method} tensors as they are",
        f", client ranks {lower}" if lower else "",
    )
    if lora_mode == "naive":
        log.warning(
            "aggregation.lora=naive averages LoRA A and B separately, which is inexact; "
            "metrics.jsonl reports the relative error per round as lora_factor_averaging_error"
        )

    def evaluate_global(params: Params) -> dict[str, Any]:
        adapter.activate(adapter.global_rank)
        adapter.set_state(params)
        s = eval_settings
        return evaluate(adapter.model, tokenizer, eval_set, s.batch_size, s.exact, s.max_new_tokens, s.group_by)

    state = load_latest(run_dir, aggregator.init(initial)) if resume else None
    if state is not None:
        log.info("resuming after round %d from %s", state.round, run_dir / "checkpoints")
        runtime.load_client_states(state.clients)
    else:
        state = ServerState(0, initial, aggregator.init(initial), [])
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    writer.rewrite(state.history)

    def record_round(rec: dict[str, Any]) -> None:
        writer.append(rec)
        log.info(round_line(rec, cfg.federation.rounds))
        if on_record is not None:
            on_record(rec)

    if state.round == 0 and not state.history:
        t = time.perf_counter()
        record: dict[str, Any] = {"round": 0}
        if cfg.evaluation.at_start:
            record.update(evaluate_global(state.params))
        record["wall_s"] = time.perf_counter() - t
        state.history.append(record)
        save_checkpoint(run_dir, state, cfg.output.keep_checkpoints)
        record_round(record)

    rounds, every = cfg.federation.rounds, cfg.evaluation.every
    settings = LoopSettings(
        rounds,
        cfg.partition.num_clients,
        cfg.clients_per_round(),
        cfg.federation.min_clients,
        cfg.seed,
        cfg.aggregation.weighting,
        cfg.output.keep_checkpoints,
        cfg.output.progress,
        cfg.aggregation.max_update_norm,
    )
    try:
        state = run_rounds(
            state,
            runtime,
            aggregator,
            settings,
            run_dir,
            evaluate_global,
            eval_due=lambda r: (every > 0 and r % every == 0) or r == rounds,
            per_client_eval=cfg.evaluation.per_client,
            on_record=record_round,
            uplink=uplink,
            downlink=downlink,
            replicas=ReplicaDownlink(downlink, initial, state.replicas) if comp.downlink_updates else None,
        )
    finally:
        runtime.close()

    final_dir = run_dir / "final_adapter"
    _export_adapter(adapter, state.params, final_dir)
    summary = summarize(
        state.history,
        {
            "run_dir": str(run_dir),
            "model": cfg.model.name,
            "adapter_method": cfg.adapter.method + ("+dora" if cfg.adapter.dora else ""),
            "num_clients": cfg.partition.num_clients,
            "trainable_params": adapter.num_trainable,
            "trainable_fraction": adapter.num_trainable / adapter.num_total,
            "final_adapter": str(final_dir),
        },
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(rounds_table(state.history))
    console.print(summary_table(summary))
    return RunResult(run_dir, summary, state)


def _eval_subset(examples: list, max_samples: int | None) -> list:
    """A fixed (seed-independent) sample, so that runs with different seeds share one eval set."""
    if max_samples is None or max_samples >= len(examples):
        return examples
    keep = sorted(np.random.default_rng(0).permutation(len(examples))[:max_samples])
    return [examples[i] for i in keep]


def check_run_dir(run_dir: Path, cfg: ExperimentConfig, resume: bool) -> None:
    has_ckpt = any((run_dir / "checkpoints").glob("round_*"))
    if has_ckpt and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoints present). Continue it with --resume, or start a "
            "new one with output.name=<new name> (or delete the directory)"
        )
    saved = run_dir / "config.yaml"
    if resume and has_ckpt and saved.is_file():
        old = validate_config(yaml.safe_load(saved.read_text()), str(saved))
        diff = {k: v for k, v in config_diff(old, cfg).items() if not k.startswith(RESUMABLE_CHANGES)}
        if diff:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the one it was started with ({lines}). "
                f"Only {', '.join(RESUMABLE_CHANGES)} may change on resume; use a new output.name otherwise"
            )


def _export_adapter(adapter: AdapterModel, params: Params, final_dir: Path) -> None:
    """Write final_adapter/ atomically (temp dir, then rename over any previous export)."""
    tmp = Path(tempfile.mkdtemp(prefix=".final_adapter-", dir=final_dir.parent))
    try:
        adapter.save(tmp, params)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.rename(tmp, final_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _setup_logging(run_dir: Path) -> None:
    logger = logging.getLogger("fedtune")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    file_handler = logging.FileHandler(run_dir / "run.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console_handler = TqdmHandler()
    console_handler.setFormatter(logging.Formatter("%(message)s"))
    console_handler.addFilter(lambda record: not getattr(record, "file_only", False))
    logger.addHandler(file_handler)
    logger.addHandler(console_handler)
