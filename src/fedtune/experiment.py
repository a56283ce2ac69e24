"""The recipe, top to bottom: set up the run directory, data, model and clients; run rounds; export.

``run_experiment`` is what ``fedtune run`` calls; it is also the Python entry point.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.aggregation.weighting import WeightCap
from fedtune.assembly import build_client_data, build_workbench, eval_subset, make_handler, plan_of, simulation_handler
from fedtune.config import ExperimentConfig, config_diff, resolve, to_yaml, validate_config
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.core.files import replace_dir
from fedtune.core.types import Params, ServerState
from fedtune.data.prepare import FederatedData, prepare_federated_data
from fedtune.evaluation.harness import EvalSet, evaluate, pair_margins
from fedtune.evaluation.tasks import build_tasks, run_tasks
from fedtune.privacy.plan import PrivacyPlan
from fedtune.reporting.console import TqdmHandler, console, round_line, rounds_table, summary_table
from fedtune.reporting.loggers import open_sinks
from fedtune.reporting.metrics import MetricsWriter, summarize
from fedtune.runtime import build_runtime
from fedtune.runtime.base import Runtime
from fedtune.server.checkpoint import load_latest
from fedtune.server.round_loop import LoopSettings, run_rounds

log = logging.getLogger("fedtune")

# keys that may change when resuming; anything else would make the resumed run a different experiment
RESUMABLE_CHANGES = ("federation.rounds", "evaluation.", "output.progress", "output.keep_checkpoints")
DEPLOYED_MAX_EXAMPLES = 1_000_000  # federation.max_client_examples unset in a deployment


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
    if cfg.compare.variants:
        raise ConfigError(
            f"this config compares {len(cfg.compare.variants)} variants: run it with `fedtune compare CONFIG`, or "
            "run its base alone with compare.variants={}"
        )
    if cfg.tune.on():
        raise ConfigError(
            f"this config searches {len(cfg.tune.space)} keys (tune.space): run it with `fedtune tune CONFIG`, or "
            "run its base alone with tune.space={}"
        )
    cfg = resolve(cfg)
    run_dir = resolve_run_dir(cfg, config_path)
    check_run_dir(run_dir, cfg, resume)
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())  # data errors leave no run dir behind
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
    plan = plan_of(cfg)  # privacy is planned here, once
    bench = build_workbench(cfg, plan)
    adapter, tokenizer, eval_settings = bench.adapter, bench.tokenizer, bench.eval_settings
    assert adapter is not None  # the server's workbench always holds the model
    clients = build_client_data(data, bench.encoder, cfg)
    eval_set = EvalSet.build(eval_subset(data.eval, cfg.evaluation.max_samples), bench.encoder)
    log.info(
        "%d clients, %s training examples; %d held-out examples; template %s",
        len(clients),
        "/".join(str(len(c.train)) for c in clients.values()),
        len(eval_set.examples),
        bench.encoder.template,
    )
    comp = cfg.compression
    if comp.uplink or comp.downlink:
        log.info(
            "compression: uplink %s; downlink %s%s",
            bench.uplink.describe(),
            bench.downlink.describe(),
            " (updates to each client's replica)" if comp.downlink_updates else "",
        )
    runtime = runtime or build_runtime(
        cfg.runtime,
        plan.placement,
        cfg.federation.round_timeout_s,
        cfg.clients_per_round(),
        lambda: make_handler(plan, bench, clients, eval_set),
        partial(simulation_handler, cfg.model_dump(mode="json"), plan.privacy_plan),
        # a quantised base is not lent: each worker quantises its own (bitsandbytes' weights are not plain arrays)
        (lambda: (cfg.model.name, *adapter.lendable()))
        if cfg.plugin().capabilities.client_base and cfg.model.quantization == "none"
        else None,
    )

    tasks = build_tasks(cfg.evaluation.tasks, bench.encoder)

    initial_margins: list[list[float]] = []  # on preference pairs: the initial adapter's, the reward's reference

    def evaluate_adapter(params: Params, r: int, on: AdapterModel | None = None) -> dict[str, Any]:
        model = on or adapter
        model.activate(model.global_rank)
        s = eval_settings
        if on is None and eval_set.pairs and not initial_margins:
            model.set_state(bench.initial)
            initial_margins.append(pair_margins(model.model, tokenizer, eval_set, s.batch_size))
        model.set_state(params)
        reference = initial_margins[0] if on is None and initial_margins else None
        out = evaluate(
            model.model,
            tokenizer,
            eval_set,
            s.batch_size,
            s.exact_at(r),
            s.max_new_tokens,
            s.group_by,
            reference=reference,
        )
        if on is not None:  # another model (offsite's emulator): the held-out set alone, not the benchmark tasks
            return out
        return out | run_tasks(tasks, model.model, s.batch_size, r, plan.rounds_to_run)

    paradigm = cfg.plugin().halves().server(plan, bench, evaluate_adapter, weight_cap(cfg, data))
    fresh = paradigm.initial_state()
    state = load_latest(run_dir, fresh.algorithm) if resume else None
    if state is not None:
        log.info("resuming after round %d from %s", state.round, run_dir / "checkpoints")
        runtime.load_client_states(state.clients)
    else:
        state = fresh
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    writer.rewrite(state.history)
    sinks = open_sinks(cfg.output.loggers, run_dir, run_dir.name, cfg.model_dump(mode="json"))

    def record_round(rec: dict[str, Any]) -> None:
        writer.append(rec)
        for sink in sinks:
            sink.log(rec)
        log.info(round_line(rec, rounds))
        if on_record is not None:
            on_record(rec)

    def save_adapter(st: ServerState) -> None:
        n = cfg.output.save_adapter_every
        if n is not None and (st.round % n == 0 or st.round == plan.rounds_to_run):
            _export_adapters(adapter, paradigm.final_adapters(st), run_dir / "adapters" / f"round_{st.round:04d}")

    privacy = plan.privacy_plan
    if privacy is not None:
        _announce_privacy(privacy)
    rounds, every = plan.rounds_to_run, cfg.evaluation.every
    settings = LoopSettings(
        rounds,
        cfg.partition.num_clients,
        cfg.clients_per_round(),
        cfg.federation.min_clients,
        cfg.seed,
        cfg.output.keep_checkpoints,
        cfg.output.progress,
        cfg.evaluation.at_start,
        cfg.evaluation.per_client,
        poisson=privacy is not None and privacy.sampling == "poisson",
    )
    try:
        state = run_rounds(
            state,
            runtime,
            paradigm,
            settings,
            run_dir,
            eval_due=lambda r: (every > 0 and r % every == 0) or r == rounds,
            on_record=record_round,
            on_state=save_adapter,
        )
    finally:
        runtime.close()
        for sink in sinks:
            sink.close()

    final_dir = run_dir / "final_adapter"
    exported = _export_adapters(adapter, paradigm.final_adapters(state), final_dir)
    summary = summarize(
        state.history,
        {
            "run_dir": str(run_dir),
            "model": cfg.model.name,
            "paradigm": cfg.paradigm.name,
            "adapter_method": cfg.adapter.method + ("+dora" if cfg.adapter.dora else ""),
            "num_clients": cfg.partition.num_clients,
            "trainable_params": adapter.num_trainable,
            "trainable_fraction": adapter.num_trainable / adapter.num_total,
            "final_adapter": str(final_dir) if exported else None,
            **paradigm.info(),
            **({"privacy": privacy.summary(state.history)} if privacy is not None else {}),
        },
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(rounds_table(state.history))
    console.print(summary_table(summary))
    return RunResult(run_dir, summary, state)


def _announce_privacy(plan: PrivacyPlan) -> None:
    told = plan.describe()
    log.info("client-level DP: %s", ", ".join(f"{k} {v}" for k, v in told.items()))
    if plan.rounds < plan.planned_rounds:
        log.warning(
            "privacy.target_epsilon=%s is spent after round %d (epsilon %.4g; round %d would reach %.4g): the run "
            "stops there instead of at federation.rounds=%d",
            plan.target_epsilon,
            plan.rounds,
            plan.epsilon(plan.rounds),
            plan.rounds + 1,
            plan.epsilon(plan.rounds + 1),
            plan.planned_rounds,
        )


def weight_cap(cfg: ExperimentConfig, data: FederatedData) -> WeightCap:
    """What one client's reported counts may weigh at most: federation.max_client_examples, else the largest
    partition (simulation: the server built it) or DEPLOYED_MAX_EXAMPLES (a deployment's clients bring their own)."""
    most = cfg.federation.max_client_examples
    if most is None:
        most = DEPLOYED_MAX_EXAMPLES if cfg.runtime.name == "flower" else max(len(p) for p in data.parts)
    return WeightCap(most, cfg.data.max_seq_len)


def saved_config_changes(run_dir: Path, cfg: ExperimentConfig, free: tuple[str, ...]) -> str:
    """'key: old -> new; ...' for the keys (other than those starting with ``free``) where ``cfg`` differs
    from the config saved in ``run_dir``; '' when none do or nothing was saved."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return ""
    old = validate_config(yaml.safe_load(saved.read_text()), str(saved))
    diff = {k: v for k, v in config_diff(old, cfg).items() if not k.startswith(free)}
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def check_run_dir(run_dir: Path, cfg: ExperimentConfig, resume: bool) -> None:
    has_ckpt = any((run_dir / "checkpoints").glob("round_*"))
    if has_ckpt and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoints present). Continue it with --resume, or start a "
            "new one with output.name=<new name> (or delete the directory)"
        )
    if resume and has_ckpt:
        lines = saved_config_changes(run_dir, cfg, RESUMABLE_CHANGES)
        if lines:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the one it was started with ({lines}). "
                f"Only {', '.join(RESUMABLE_CHANGES)} may change on resume; use a new output.name otherwise"
            )


def _export_adapters(adapter: AdapterModel, adapters: dict[str, Params], final_dir: Path) -> bool:
    """Write final_adapter/ atomically (temp dir, then rename over any previous export): the global
    adapter itself (name ""), or one folder per named adapter (e.g. each KD client's own). Adapters
    of another shape than the server's (another model) are left to their clients, with a log line."""
    fits = {n: p for n, p in adapters.items() if _fits(adapter, p)}
    for name in sorted(adapters.keys() - fits.keys()):
        log.info("final adapter %s belongs to another model than model.name: its client keeps it", name)
    if not fits:
        return False

    def write(folder: Path) -> None:
        for name, params in sorted(fits.items()):
            adapter.save(folder / name if name else folder, params)

    replace_dir(final_dir, write)
    return True


def _fits(adapter: AdapterModel, params: Params) -> bool:
    adapter.activate(adapter.global_rank)
    mine = adapter.params
    return params.keys() == mine.keys() and all(params[k].shape == mine[k].shape for k in mine)


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
