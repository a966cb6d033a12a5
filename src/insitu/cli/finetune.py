"""``insitu finetune MODEL --data FILE``: private on-device fine-tuning of the last layers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.finetune import finetune as run_finetune
from insitu.workspace import Workspace

__all__ = ["finetune"]


@app.command(rich_help_panel="Operations")
def finetune(
    model: Annotated[str, typer.Argument(help="The installed model to fine-tune.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled local records (CSV or Parquet).")],
    epsilon: Annotated[
        float, typer.Option(help="Epsilon this fine-tuning spends of the site's budget.")
    ] = 1.0,
    epochs: Annotated[int, typer.Option(min=1, help="Local epochs of DP-SGD.")] = 3,
    layers: Annotated[int, typer.Option(min=1, help="Last linear layers to train.")] = 1,
    holdout: Annotated[
        float, typer.Option(help="Fraction of records held out to compare the versions.")
    ] = 0.3,
    learning_rate: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 0.5,
    schema: Annotated[
        Path | None,
        typer.Option("--schema", help="Data schema, when the model card carries none."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split and of the sampling.")] = 0,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Fine-tune the installed model on local data with DP-SGD; install it only if better.

    The epsilon is charged to the site's privacy budget for the data set (the one
    federated training spends) before training; a fine-tuning that would exceed it is
    refused and recorded.

    [dim]Example:[/] insitu finetune adult-income --data recent.csv --epsilon 0.5
    """
    ws = Workspace.open(home)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_output,
        transient=True,
    ) as progress:
        task = progress.add_task("fine-tuning", total=None)
        result = run_finetune(
            ws,
            model,
            data,
            epsilon=epsilon,
            epochs=epochs,
            layers=layers,
            holdout=holdout,
            learning_rate=learning_rate,
            schema_path=schema,
            seed=seed,
            on_stage=lambda text: progress.update(task, description=text),
        )
    if json_output:
        print_json(result.to_json())
        return
    figures = (
        f"held-out accuracy {result.accuracy_installed:.4f} installed, "
        f"{result.accuracy_finetuned:.4f} fine-tuned ({result.rows_holdout} records); "
        f"epsilon {result.epsilon_spent_total:.3f} of {result.epsilon_budget} spent"
    )
    if result.installed:
        out.print(
            f"[bold green]installed[/] {model} {result.version} (local version of "
            f"{result.base_version}): {figures}"
        )
    else:
        out.print(
            f"[bold yellow]kept[/] {model} {result.base_version}: the fine-tuned model is not "
            f"better; {figures}"
        )
