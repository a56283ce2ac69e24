"""Command line: ``fedtune run CONFIG [key=value ...] [--resume]`` and friends."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.table import Table

from fedtune.config import ExperimentConfig, load_config
from fedtune.core.errors import FedtuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Federated fine-tuning of LLMs.",
)

Overrides = Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides, e.g. federation.rounds=3")]
FinishedRun = Annotated[Path, typer.Argument(help="a finished run directory (holds config.yaml and final_adapter/)")]
AdapterName = Annotated[str | None, typer.Option("--adapter", help="which named final adapter (KD: one per client)")]


def _fail(exc: Exception) -> NoReturn:
    from rich.markup import escape

    from fedtune.reporting.console import console

    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True)
    raise typer.Exit(2)


@contextmanager
def _reported() -> Iterator[None]:
    """Every command's errors a user can act on print as one line without a traceback (exit 2); Ctrl-C exits 130."""
    try:
        yield
    except FedtuneError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


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
    """Validate the config, then run."""
    with _reported():
        cfg = make_config()
        from fedtune.experiment import run_experiment  # heavy imports only once the config is valid

        run_experiment(cfg, config_path, resume=resume)


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="experiment YAML with a compare section")],
    overrides: Overrides = None,
) -> None:
    """Run CONFIG's compare.variants for compare.seeds seeds each, side by side: a comparison directory
    with every run, comparison.json, comparison.md and plots. Re-running continues a killed comparison
    without repeating finished runs."""
    import shlex

    with _reported():
        cfg = load_config(config, overrides)
        from fedtune.compare.plan import plan
        from fedtune.compare.runner import run_comparison
        from fedtune.experiment import resolve_run_dir

        command = shlex.join(["fedtune", "compare", str(config), *(overrides or [])])
        run_comparison(plan(cfg, resolve_run_dir(cfg, config)), command)


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="experiment YAML with a tune section")],
    overrides: Overrides = None,
) -> None:
    """Search CONFIG's tune.space (random search or TPE; successive halving or Hyperband with rounds as the
    budget): every trial a run directory, tune.json and tune.md, and with tune.seeds the base config beside
    the best setting over seeds. Re-running continues a killed search."""
    import shlex

    with _reported():
        cfg = load_config(config, overrides)
        from fedtune.experiment import resolve_run_dir
        from fedtune.tune.runner import run_search

        command = shlex.join(["fedtune", "tune", str(config), *(overrides or [])])
        run_search(cfg, resolve_run_dir(cfg, config), command)


@app.command()
def flowertune(
    pyproject: Annotated[Path, typer.Argument(help="a FlowerTune challenge's pyproject.toml")],
    overrides: Overrides = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="a local copy of the static dataset (default: its hub id)")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="another base than the project's model.name")] = None,
    out: Annotated[str, typer.Option("--out", help="parent directory of the run")] = "runs",
    resume: Annotated[bool, typer.Option("--resume", help="continue the run from its last round")] = False,
    evals: Annotated[
        list[str] | None,
        typer.Option("--eval", help="COLUMN=PATH: a local copy of a leaderboard column's benchmark set (e.g. fpb=...)"),
    ] = None,
    eval_tokens: Annotated[
        int | None, typer.Option("--eval-tokens", min=1, help="most tokens generated per answer in --eval scoring")
    ] = None,
) -> None:
    """Run a FlowerTune LLM challenge as its pyproject.toml sets it (static dataset with the challenge's
    preprocessing, clients, fraction, per-round cosine learning rate, LoRA, FedAvg), and report the
    communication against the leaderboard's 200,000 MB budget and whether the run could be an entry."""
    from fedtune.reporting.console import console

    with _reported():
        from fedtune.flowertune.runner import run_challenge

        pairs = [e.partition("=") for e in evals or []]
        bad = [e for e, (_, eq, path) in zip(evals or [], pairs, strict=True) if not eq or not path]
        if bad:
            raise FedtuneError(f"--eval {bad[0]}: give COLUMN=PATH, e.g. --eval fpb=data/fpb.parquet")
        evaluations = {k: p for k, _, p in pairs}
        done = run_challenge(pyproject, dataset, model, out, overrides, resume, evaluations, eval_tokens)
    r = done.report
    table = Table(title=f"FlowerTune {r['challenge']} challenge", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    c = r["communication"]
    table.add_row("communication (up + down)", f"{c['total_mb']:,.1f} MB = {c['total_gb']:.3f} GB")
    table.add_row(
        "of the 200,000 MB budget", f"{100 * c['share_of_budget']:.3f}%" + ("" if c["within_budget"] else " (over)")
    )
    for column, value in r["columns"].items():
        table.add_row(column, "not evaluated" if value is None else f"{100 * value:.2f}")
    table.add_row("leaderboard-valid", "yes" if r["leaderboard_valid"] else "no")
    console.print(table)
    for why in r["not_valid_because"]:
        console.print(f"  not leaderboard-valid: {why}")
    console.print(f"report: {done.run_dir / 'challenge.json'}")


@app.command()
def server(
    config: Annotated[Path, typer.Argument(help="experiment YAML with runtime.name=flower")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last complete round")] = False,
) -> None:
    """Coordinate a deployed federation: start Flower's SuperLink, enrol client keys, run CONFIG."""

    def start(cfg: ExperimentConfig) -> int:
        from fedtune.deploy.coordinator import run_coordinator

        return run_coordinator(cfg, config, resume)

    _deployed(config, overrides, start)


@app.command()
def client(
    config: Annotated[Path, typer.Argument(help="the federation's experiment YAML")],
    overrides: Overrides = None,
    data: Annotated[Path, typer.Option("--data", help="this client's own training data (.jsonl/.json/.parquet)")] = ...,
    key: Annotated[Path | None, typer.Option("--key", help="this client's enrolment key (NAME.key)")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="client name; default the key's (or data file's) stem")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="where this client keeps its state")] = None,
    refused_retry_s: Annotated[
        float, typer.Option("--refused-retry-s", help="keep retrying this long when the coordinator refuses the key")
    ] = 120.0,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="torch threads (default: all cores; 1 for many clients per machine)"),
    ] = None,
) -> None:
    """Join a deployed federation with this machine's data; serves (across coordinator restarts) until Ctrl-C."""

    def start(cfg: ExperimentConfig) -> int:
        from fedtune.deploy.participant import run_participant

        return run_participant(cfg, config, data, key, name, state_dir, refused_retry_s, threads)

    _deployed(config, overrides, start)


def _deployed(config: Path, overrides: list[str] | None, start: Callable[[ExperimentConfig], int]) -> None:
    """Load CONFIG as a deployment (runtime.name=flower), run a deployment command, exit with its code."""
    with _reported():
        code = start(load_config(config, ["runtime.name=flower", *(overrides or [])]))
    raise typer.Exit(code)


@app.command()
def certs(
    out: Annotated[Path, typer.Argument(help="folder to write the CA, server certificate and client keys into")],
    clients: Annotated[int, typer.Option("--clients", help="client key pairs to create: client-0 ...")] = 0,
    name: Annotated[list[str] | None, typer.Option("--name", help="a named client key pair (repeatable)")] = None,
    host: Annotated[
        list[str] | None, typer.Option("--host", help="a name or IP clients use to reach the coordinator (repeatable)")
    ] = None,
    add: Annotated[bool, typer.Option("--add", help="only add client key pairs to an existing folder")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an existing CA, or with --add existing client keys")
    ] = False,
) -> None:
    """Create a test federation's credentials: CA, server TLS certificate, client enrolment keys."""
    from fedtune.deploy.certs import add_client_keys, write_certs
    from fedtune.reporting.console import console

    names = [f"client-{i}" for i in range(clients)] + list(name or [])
    with _reported():
        if add:
            written = add_client_keys(out / "clients", names, overwrite)
        else:
            hosts = list(dict.fromkeys([*(host or []), "127.0.0.1", "localhost"]))
            written = write_certs(out, hosts, names, overwrite=overwrite)
    console.print(f"wrote {len(written)} files to {out}:")
    for p in written:
        console.print(f"  {p}")
    console.print("give each client ca.crt and its own clients/NAME.key; keep ca.key and server.key on the coordinator")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    plot: Annotated[bool, typer.Option("--plot", help="also draw the run's curves to RUN_DIR/curves.png")] = False,
) -> None:
    """Print the per-round table and summary of a run (with --plot, draw its curves)."""
    from fedtune.reporting.console import console, rounds_table, summary_table
    from fedtune.reporting.metrics import read_metrics

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        _fail(FedtuneError(f"{metrics} does not exist; is {run_dir} a fedtune run directory?"))
    console.print(rounds_table(read_metrics(metrics)))
    summary = run_dir / "summary.json"
    if summary.is_file():
        console.print(summary_table(json.loads(summary.read_text())))
    if plot:
        from fedtune.reporting.plots import draw_run

        console.print(f"wrote {draw_run(read_metrics(metrics), run_dir / 'curves.png')}")


@app.command()
def export(
    run_dir: FinishedRun,
    out: Annotated[
        Path | None, typer.Option("--out", help="where the merged model goes (default RUN_DIR/merged)")
    ] = None,
    adapter: AdapterName = None,
    gguf: Annotated[bool, typer.Option("--gguf", help="also write OUT/model.gguf (Llama-family models)")] = False,
) -> None:
    """Fold a run's final adapter into its base model: a plain transformers checkpoint (safetensors and
    tokenizer) that loads without fedtune or peft, and with --gguf a GGUF file for llama.cpp."""
    from fedtune.adapters.merge import adapter_folder, merged_model, save_merged
    from fedtune.models.loading import load_model
    from fedtune.reporting.console import console

    with _reported():
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise FedtuneError(f"{config} does not exist; is {run_dir} a fedtune run directory?")
        cfg = load_config(config)
        folder = adapter_folder(run_dir / "final_adapter", adapter)
        m = cfg.model
        loaded = load_model(m.name, m.dtype, m.revision, m.gguf_file, m.trust_remote_code)
        model = merged_model(loaded.model, folder)
        target = out or run_dir / "merged"
        save_merged(model, loaded.tokenizer, target)
        console.print(f"wrote the merged model and its tokenizer to {target}")
        if gguf:
            from fedtune.models.gguf_export import source_pre, write_gguf

            path = write_gguf(model, loaded.tokenizer, target / "model.gguf", source_pre(m.name, m.gguf_file))
            console.print(f"wrote {path}")


@app.command("lm-eval")
def lm_eval(
    run_dir: FinishedRun,
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated lm-eval task names")],
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="a folder of lm-eval task YAML files (local data)")
    ] = None,
    adapter: AdapterName = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="the first N examples of each task")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", min=0, help="few-shot examples")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sequences per batch")] = 8,
    base: Annotated[bool, typer.Option("--base", help="also score the base model, for comparison")] = False,
) -> None:
    """Score a run's final model with lm-evaluation-harness on tasks whose data you have (RUN_DIR/lm_eval.json)."""
    from fedtune.evaluation.lm_eval_handoff import evaluate_run
    from fedtune.reporting.console import console

    with _reported():
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        report = evaluate_run(run_dir, names, include_path, adapter, limit, num_fewshot, batch_size, base)
        table = Table(title="lm-eval")
        columns = list(report["scores"])
        for header in ("task", "metric", *columns):
            table.add_column(header, justify="left" if header in ("task", "metric") else "right")
        final = report["scores"]["final"]
        for task in sorted(final):
            for metric in sorted(final[task]):
                cells = [f"{report['scores'][c].get(task, {}).get(metric, float('nan')):.4f}" for c in columns]
                table.add_row(task, metric, *cells)
        console.print(table)
        console.print(f"wrote {run_dir / 'lm_eval.json'}")


@app.command()
def data(
    config: Annotated[Path, typer.Argument(help="experiment YAML")],
    overrides: Overrides = None,
    export: Annotated[
        Path | None, typer.Option("--export", help="write each client's share to DIR/client-N.jsonl")
    ] = None,
) -> None:
    """Show how CONFIG's data is split across clients (sizes and label mix), without training.

    With --export, write each client's training share as its own JSONL file: what a deployed
    client (`fedtune client CONFIG --data DIR/client-N.jsonl`) would hold.
    """
    from fedtune.data.partitioners import label_histogram
    from fedtune.data.prepare import prepare_federated_data
    from fedtune.reporting.console import console

    with _reported():
        cfg = load_config(config, overrides)
        fed = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
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
    if export is not None:
        from fedtune.data.formats import write_jsonl

        for cid, part in enumerate(fed.parts):
            write_jsonl((fed.train[i] for i in part), export / f"client-{cid}.jsonl")
        console.print(f"wrote {len(fed.parts)} client files to {export}/client-N.jsonl")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
