"""Command line: ``fedtune run CONFIG [key=value ...] [--resume]`` and friends."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedtune.config import ExperimentConfig, load_config
from fedtune.errors import FedtuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Federated fine-tuning of LLMs.",
)

Overrides = Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides, e.g. federation.rounds=3")]


def _fail(exc: Exception) -> None:
    from rich.markup import escape

    from fedtune.reporting.console import console

    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="experiment YAML")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run from its last complete round")] = False,
) -> None:
    """Run a federated fine-tuning experiment described by CONFIG."""
    _run_guarded(lambda: load_config(config, overrides), config, resume)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (holds config.yaml and checkpoints/)")],
    overrides: Overrides = None,
) -> None:
    """Continue a run from its directory, with the config it was started with."""
    keep_place = [f"output.dir={run_dir.parent}", f"output.name={run_dir.name}"]
    _run_guarded(lambda: load_config(run_dir / "config.yaml", [*keep_place, *(overrides or [])]), None, True)


def _run_guarded(make_config: Callable[[], ExperimentConfig], config_path: Path | None, resume: bool) -> None:
    """Validate the config, then run; our errors print as one line (exit 2), Ctrl-C exits 130."""
    try:
        cfg = make_config()
        from fedtune.experiment import run_experiment  # heavy imports only once the config is valid

        run_experiment(cfg, config_path, resume=resume)
    except FedtuneError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Print the per-round table and summary of a run."""
    from fedtune.reporting.console import console, rounds_table, summary_table
    from fedtune.reporting.metrics import read_metrics

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        _fail(FedtuneError(f"{metrics} does not exist; is {run_dir} a fedtune run directory?"))
    console.print(rounds_table(read_metrics(metrics)))
    summary = run_dir / "summary.json"
    if summary.is_file():
        console.print(summary_table(json.loads(summary.read_text())))


@app.command()
def data(config: Annotated[Path, typer.Argument(help="experiment YAML")], overrides: Overrides = None) -> None:
    """Show how CONFIG's data is split across clients (sizes and label mix), without training."""
    from fedtune.data.partitioners import label_histogram
    from fedtune.data.prepare import prepare_federated_data
    from fedtune.reporting.console import console

    try:
        cfg = load_config(config, overrides)
        fed = prepare_federated_data(cfg.data, cfg.partition, cfg.seed)
    except FedtuneError as exc:
        _fail(exc)
    field = cfg.partition.field or ("task" if fed.train and "task" in fed.train[0].meta else None)
    table = Table(title=f"{len(fed.train)} train / {len(fed.eval)} eval examples, {cfg.partition.method} split")
    table.add_column("client", justify="right")
    table.add_column("examples", justify="right")
    if field:
        table.add_column(f"by {field}")
        labels = [str(ex.meta.get(field)) for ex in fed.train]
        for cid, hist in enumerate(label_histogram(fed.parts, labels)):
            table.add_row(str(cid), str(len(fed.parts[cid])), ", ".join(f"{k}: {v}" for k, v in hist.items()))
    else:
        for cid, part in enumerate(fed.parts):
            table.add_row(str(cid), str(len(part)))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
