"""Run a search: Optuna asks for a setting, the setting runs as a normal run, each evaluated round is reported.

The study lives in ``<search>/study.journal`` (Optuna's journal file: every ask, report and tell is appended),
each trial in ``<search>/trials/trial-NNN`` (a run directory like any other). A killed search continues where it
stopped: finished trials are kept, and the trial that was running continues from its run's last checkpoint as
the same trial (its number, and so its Hyperband bracket, unchanged; a stop already decided is honoured). Every
trial's setting is a function of (seed, trial number) and the trials before it, so the search is repeatable.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedtune.compare.plan import PlannedRun, base_raw, plan
from fedtune.compare.runner import run_comparison, status
from fedtune.config import ExperimentConfig, validate_config
from fedtune.config.tune import TuneConfig
from fedtune.core import rng
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.experiment import run_experiment
from fedtune.reporting.console import console
from fedtune.server.checkpoint import recorded_history
from fedtune.tune.report import write_report
from fedtune.tune.space import distributions, trial_config

log = logging.getLogger(__name__)
STUDY = "fedtune"


class _Stop(Exception):
    """Raised from a run's record hook: the scheduler stops this trial at this rung."""


def _pruner(t: TuneConfig, rounds: int):
    import optuna

    if t.scheduler == "none":
        return optuna.pruners.NopPruner()
    if t.scheduler == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=t.min_rounds, reduction_factor=t.reduction_factor)
    return optuna.pruners.HyperbandPruner(t.min_rounds, rounds, t.reduction_factor)


def _sampler(t: TuneConfig, seed: int, number: int):
    """Trial ``number``'s sampler: seeded by (seed, number), so a resumed search draws what it would have."""
    import optuna

    s = int(rng.numpy_rng(rng.TUNE_TRIAL, seed, index=number).integers(2**31 - 1))
    return optuna.samplers.RandomSampler(seed=s) if t.sampler == "random" else optuna.samplers.TPESampler(seed=s)


def check(base: ExperimentConfig) -> None:
    """ConfigError for a search that cannot measure what it asks."""
    t = base.tune
    if not t.on():
        raise ConfigError(
            "nothing to search: add a tune section with a space, e.g.\n"
            "tune:\n  trials: 12\n  space:\n    training.lr: {low: 1.0e-4, high: 1.0e-2, log: true}"
        )
    if base.compare.variants:
        raise ConfigError("a config both compares variants and searches; give it one of compare or tune")
    if t.scheduler != "none" and base.evaluation.every != 1:
        raise ConfigError(
            f"tune.scheduler={t.scheduler} compares trials at every rung: set evaluation.every: 1 "
            f"(it is {base.evaluation.every}), or tune.scheduler: none"
        )
    if t.min_rounds >= base.federation.rounds and t.scheduler != "none":
        raise ConfigError(
            f"tune.min_rounds={t.min_rounds} leaves the scheduler no rung below federation.rounds="
            f"{base.federation.rounds}; lower it or set tune.scheduler: none"
        )
    if t.metric.startswith("client_eval") and not base.evaluation.per_client:
        raise ConfigError(f"tune.metric={t.metric} is measured by the clients: set evaluation.per_client: true")


def run_search(base: ExperimentConfig, directory: Path, command: str) -> Path:
    """Run the trials not yet run (and the final comparison when ``tune.seeds``); tune.json and tune.md."""
    check(base)
    try:
        import optuna
    except ImportError:
        raise ConfigError("fedtune tune searches with Optuna: pip install 'fedtune[tune]'") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t, rounds = base.tune, base.federation.rounds
    (directory / "trials").mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(directory / "study.journal")))
    study = optuna.create_study(
        study_name=STUDY, storage=storage, load_if_exists=True, direction=t.direction(), pruner=_pruner(t, rounds)
    )
    _check_same_search(study, base, directory)
    dists = distributions(t.space)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    done = len(study.trials) - len(running)
    console.print(
        f"search {directory}: {t.trials} trials of {len(t.space)} keys, {t.sampler} search, scheduler {t.scheduler} "
        f"over {rounds} rounds" + (f"; {done} finished before" if done else "")
    )
    for frozen in running:  # the trial a killed search was running: the same trial goes on
        _run_trial(optuna.trial.Trial(study, frozen._trial_id), base, directory, t.metric)
        write_report(study, base, directory, command)
    while len(study.trials) < t.trials:
        study.sampler = _sampler(t, base.seed, len(study.trials))
        trial = study.ask(dists)
        _run_trial(trial, base, directory, t.metric)
        write_report(study, base, directory, command)
    path = write_report(study, base, directory, command)
    if t.seeds:
        path = _final_comparison(study, base, directory, command)
    console.print(f"search written to {path}")
    return path


def _check_same_search(study: Any, base: ExperimentConfig, directory: Path) -> None:
    """A search directory holds one search: a different tune section or base config is an error."""
    mark = directory / "search.json"
    now = json.loads(base.model_dump_json())
    if mark.is_file():
        before = json.loads(mark.read_text())
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(
                f"{directory} holds a search of another config (sections {', '.join(changed)} differ); give this one "
                "a new output.name, or delete that directory"
            )
    elif study.trials:
        raise ConfigError(f"{directory} holds trials but no search.json; delete it or choose another output.name")
    else:
        mark.write_text(json.dumps(now, indent=1))


def _run_trial(trial: Any, base: ExperimentConfig, directory: Path, metric: str) -> None:
    """Run (or continue, from its run's last checkpoint) one trial's run and tell the study how it ended."""
    from optuna.trial import TrialState

    study = trial.study
    run_dir = directory / "trials" / f"trial-{trial.number:03d}"
    params = dict(trial.params)
    what = f"trial {trial.number} {_describe(params)}"
    try:
        cfg = trial_config(base, params, run_dir)
    except ConfigError as exc:  # a setting the config refuses costs its trial, not the search
        console.print(f"{what}: not a valid config: {exc}", markup=False)
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        return
    reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)
    last: dict[str, float] = {}
    rounds = cfg.federation.rounds

    def on_record(record: dict[str, Any]) -> None:
        value = record.get(metric)
        if value is None or record["round"] == 0:
            return
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise FedtuneError(f"{metric} of round {record['round']} is {value!r}")
        last["value"], last["round"] = float(value), record["round"]
        if record["round"] not in reported:
            trial.report(float(value), record["round"])
            reported.add(record["round"])
        if record["round"] < rounds and trial.should_prune():  # a rung at the last round would stop nothing
            raise _Stop

    state = status(PlannedRun(run_dir.name, base.seed, cfg))  # done, resume or new; another config is an error
    resume = state == "resume"
    console.print(f"{what}: {'continuing' if resume else 'running'} -> {run_dir}", markup=False)
    try:
        if state != "new":  # the rounds its run went through before the kill, reported where they were not yet
            for record in recorded_history(run_dir):
                on_record(record)
        if state != "done":
            run_experiment(cfg, resume=resume, on_record=on_record)
    except _Stop:
        console.print(f"{what}: stopped after round {last['round']} ({metric} {last['value']:.4f})", markup=False)
        study.tell(trial, state=TrialState.PRUNED)
        return
    except FedtuneError as exc:  # a run that fails (every client diverged) costs its trial
        console.print(f"{what}: failed: {exc}", markup=False)
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        return
    if "value" not in last:
        trial.set_user_attr("error", f"no evaluated round reported {metric}")
        study.tell(trial, state=TrialState.FAIL)
        return
    console.print(f"{what}: {metric} {last['value']:.4f} after {last['round']} rounds", markup=False)
    study.tell(trial, last["value"])


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _final_comparison(study: Any, base: ExperimentConfig, directory: Path, command: str) -> Path:
    """The base config and the best setting side by side over ``tune.seeds`` seeds: a comparison in final/."""
    best = _best(study)
    if best is None:
        raise FedtuneError("no trial finished, so there is no best setting to compare with the base config")
    raw = base_raw(base, "tune", "compare")
    raw["compare"] = {"seeds": base.tune.seeds, "variants": {"base": {}, "best": dict(best.params)}}
    raw.setdefault("output", {})["dir"] = str(directory)
    raw["output"]["name"] = "final"
    cfg = validate_config(raw, "tune's final comparison")
    console.print(f"the base config beside the best setting (trial {best.number}), {base.tune.seeds} seeds each")
    return run_comparison(plan(cfg, directory / "final"), command)


def _best(study: Any) -> Any:
    """The finished trial of the best value (the lowest, or the highest where the metric is maximised)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1 if study.direction == StudyDirection.MINIMIZE else -1
    return min(complete, key=lambda tr: (sign * tr.value, tr.number)) if complete else None
