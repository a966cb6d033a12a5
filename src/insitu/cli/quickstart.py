"""``insitu quickstart``: the first thing a newcomer runs (the job is ``insitu.quickstart``).

Parses the options, shows progress, calls :func:`insitu.quickstart.run_quickstart` and
prints its steps and summary (or ``--json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import JsonOption, err_console, out, print_json
from insitu.federated import RoundRecord
from insitu.quickstart import STEPS, QuickstartSettings, StepResult, run_quickstart

__all__ = ["quickstart"]


@app.command(rich_help_panel="Start here")
def quickstart(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to create the demo workspaces and files.")
    ] = Path("insitu-quickstart"),
    sites: Annotated[int, typer.Option(min=3, help="Number of simulated sites.")] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    epsilon: Annotated[float, typer.Option(help="Record-level epsilon per site.")] = 3.0,
    local_epochs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Local epochs per round at each site (5 with rate 1.0: the settings tuned "
            "on this public data in benchmarks/federated_bench.py).",
        ),
    ] = 5,
    rows: Annotated[
        int | None,
        typer.Option(min=100, help="Use a random sample of this many rows (a quicker look)."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Run the whole job on the data insitu carries, verify the evidence, write the report.

    [dim]Example:[/] insitu quickstart --out /tmp/demo --epsilon 1
    """
    settings = QuickstartSettings(
        out_dir=out_dir,
        sites=sites,
        rounds=rounds,
        epsilon=epsilon,
        local_epochs=local_epochs,
        rows=rows,
    )
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_output,
    ) as progress:
        task = progress.add_task("quickstart", total=rounds + len(STEPS))

        def on_step(description: str) -> None:
            progress.update(task, advance=1, description=description)

        def on_round(record: RoundRecord) -> None:
            eps = max(record.epsilon_by_site.values(), default=0.0)
            accuracy = record.central_accuracy
            shown = "-" if accuracy is None else f"{accuracy:.3f}"
            progress.update(
                task,
                advance=1,
                description=f"round {record.round}/{rounds}: accuracy {shown}, epsilon {eps:.2f}",
            )

        result = run_quickstart(settings, on_step=on_step, on_round=on_round)
    summary = result.to_json()
    if json_output:
        print_json(summary)
        return
    _print_summary(summary, {step.step: step for step in result.steps})


def _print_summary(summary: dict[str, Any], results: dict[str, StepResult]) -> None:
    steps = Table(title="insitu quickstart: steps", title_justify="left")
    steps.add_column("step", style="bold")
    steps.add_column("", no_wrap=True)
    steps.add_column("result", overflow="fold")
    for name in STEPS:
        step = results.get(name)
        if step is None:
            continue
        mark = "[green]ok[/]" if step.status == "ok" else f"[dim]{step.status}[/]"
        steps.add_row(name, mark, step.summary)
    out.print(steps)

    def figure(value: Any, text: str) -> str:
        return "[dim]not run[/]" if value is None else text

    table = Table(title="summary", title_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("value")
    table.add_row(
        "accuracy (federated, DP)",
        f"{summary['private_accuracy']:.4f} vs {summary['baseline_accuracy']:.4f} non-private "
        "baseline (sites' held-out records)",
    )
    table.add_row(
        "epsilon of this run",
        f"{summary['epsilon_run']:.2f} (target {summary['epsilon_target']}; per site "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(summary["epsilon_by_site"].items()))
        + ")",
    )
    table.add_row(
        "epsilon spent so far",
        ", ".join(f"{k} {v:.2f}" for k, v in sorted(summary["epsilon_spent_max_by_site"].items()))
        + " (the most any one subject at each site has spent, every run included)",
    )
    table.add_row("membership attack AUC", f"{summary['attack_auc']:.4f} (0.5 is chance)")
    before = summary["model_bytes_before"]
    after = summary["model_bytes_after"]
    table.add_row(
        "model size before / after",
        f"{before:,} bytes / " + figure(after, f"{after or 0:,} bytes"),
    )
    table.add_row("p50 latency", figure(summary["p50_ms"], f"{summary['p50_ms'] or 0:.2f} ms"))
    verified, total = summary["ledgers_verified"]
    table.add_row(
        "ledgers verified",
        f"[green]{verified} of {total}[/]"
        if verified == total
        else f"[red]{verified} of {total}[/]",
    )
    out.print(table)
    out.print(f"report: [bold]{summary['report']}[/]")
    out.print(f"[bold green]done[/] in {summary['seconds']} s")
