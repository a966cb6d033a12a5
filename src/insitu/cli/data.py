"""``insitu data``: see what a schema does to a data set, and prepare a sealed release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.data import DataSchema, SiteDataset, inspect_table, read_table
from insitu.workspace import Workspace

__all__ = ["data_app"]

data_app = typer.Typer(
    help=(
        "Data protection at the source: a schema declares every column (feature, label, "
        "identifier, quasi-identifier) and what happens to it; only declared features "
        "ever reach a model."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data", rich_help_panel="Data")

FileArgument = Annotated[
    Path, typer.Argument(help="A CSV, gzipped CSV or Parquet file.", exists=True, dir_okay=False)
]
SchemaOption = Annotated[
    Path,
    typer.Option("--schema", "-s", help="The data schema (TOML).", exists=True, dir_okay=False),
]


@data_app.command("inspect")
def inspect(file: FileArgument, schema: SchemaOption, json_output: JsonOption = False) -> None:
    """Show what would be processed and dropped, and warn about identifier-like features.

    Nothing is written.

    [dim]Example:[/] insitu data inspect patients.csv --schema patients.schema.toml
    """
    parsed = DataSchema.load(schema)
    report = inspect_table(read_table(file), parsed, source=file.name)
    doc: dict[str, Any] = {
        "rows": report.rows,
        "features": report.features,
        "label": report.label,
        "pseudonymized": report.pseudonymized,
        "generalized": report.generalized,
        "kept": report.kept,
        "dropped": report.dropped,
        "undeclared_excluded": report.undeclared,
        "identifier_like_columns": {c: f.kinds for c, f in report.findings.items()},
        "warnings": report.warnings,
    }
    if json_output:
        print_json(doc)
        return
    table = Table(title=f"{file.name}: {report.rows} rows", title_justify="left")
    table.add_column("what happens", style="bold")
    table.add_column("columns", overflow="fold")
    table.add_row("model features", ", ".join(report.features))
    table.add_row("label", report.label)
    table.add_row("pseudonymized", ", ".join(report.pseudonymized) or "-")
    table.add_row(
        "generalized", ", ".join(f"{c} ({r})" for c, r in report.generalized.items()) or "-"
    )
    table.add_row("kept (not features)", ", ".join(report.kept) or "-")
    table.add_row("dropped", ", ".join(report.dropped) or "-")
    table.add_row("undeclared: excluded", ", ".join(report.undeclared) or "-")
    out.print(table)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)


@data_app.command("prepare")
def prepare_command(
    file: FileArgument,
    schema: SchemaOption,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory of the sealed release.", file_okay=False)
    ],
    home: HomeOption = None,
    k: Annotated[
        int | None,
        typer.Option(min=1, help="Required k-anonymity [default: the schema's privacy.k]."),
    ] = None,
    suppress: Annotated[
        bool, typer.Option("--suppress", help="Remove rows of classes smaller than k.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Release below k anyway (recorded in the ledger).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Prepare a release: minimize, pseudonymize, generalize, check k, seal with the site key.

    The release is encrypted with this site's data key; only a manifest of counts and
    column names is written in the clear. The preparation is recorded in the ledger.

    [dim]Examples:[/]
      insitu data prepare patients.csv -s patients.schema.toml -o prepared/ --k 5 --suppress
    """
    ws = Workspace.open(home)
    dataset = SiteDataset.from_file(
        ws, file, DataSchema.load(schema), k=k, suppress=suppress, force=force, out=out_dir
    )
    report = dataset.prepared.report
    if json_output:
        print_json(report.to_json() | {"out": str(out_dir)})
        return
    kanon = report.k_anonymity
    out.print(
        f"prepared [bold]{report.rows_out}[/] of {report.rows_in} rows of {report.dataset} into "
        f"{out_dir} (sealed); {len(report.columns)} columns released, "
        f"{len(report.dropped) + len(report.undeclared)} excluded; "
        f"{kanon['smallest_class']}-anonymous over "
        f"{', '.join(kanon['quasi_identifiers']) or 'nothing'}"
        + (f"; {report.rows_suppressed} rows suppressed" if report.rows_suppressed else "")
    )
    if report.forced_below_k:
        err_console.print(f"[yellow]warning:[/] released below k={kanon['k_requested']} (forced)")
