"""``insitu drift status``: per-feature drift of the models this site runs."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.drift import drift_status
from insitu.workspace import Workspace

__all__ = ["drift_app"]

drift_app = typer.Typer(
    help=(
        "Drift of what the models see against the DP reference profile in their cards "
        "(PSI and a chi-square test per feature; thresholds in config.toml [drift])."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(drift_app, name="drift", rich_help_panel="Operations")


@drift_app.command("status")
def status(
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Per-feature PSI and p-value of every monitored model version, and what is flagged.

    [dim]Example:[/] insitu drift status --json
    """
    ws = Workspace.open(home)
    models = drift_status(ws, model=model)
    if json_output:
        print_json({"models": models})
        return
    if not models:
        out.print("no model has been monitored yet (the runtime records drift as it serves)")
        return
    for doc in models:
        limits = doc["thresholds"]
        table = Table(
            title=f"{doc['model']} {doc['version']}: {doc['rows']:,} rows, "
            f"updated {doc['updated']}",
            title_justify="left",
            caption=f"flagged: PSI >= {limits['psi_threshold']} and p < {limits['p_value']} "
            f"(after {limits['min_samples']} rows)",
            caption_justify="left",
        )
        for column in ("feature", "PSI", "p-value", "drift"):
            table.add_column(column, justify="left" if column == "feature" else "right")
        rows = doc["features"] + ([doc["output"]] if doc["output"] else [])
        for figure in sorted(rows, key=lambda f: -f["psi"]):
            table.add_row(
                figure["feature"],
                f"{figure['psi']:.3f}",
                f"{figure['p_value']:.2g}",
                "[bold red]DRIFT[/]" if figure["flagged"] else "ok",
            )
        out.print(table)
