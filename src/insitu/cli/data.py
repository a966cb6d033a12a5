"""``insitu data``: see what a schema does to a data set, and prepare a sealed release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.data import (
    ArraySchema,
    ArrayTable,
    SiteDataset,
    array_table,
    inspect_table,
    load_schema,
    out_of_range_warnings,
    read_table,
)
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
    Path,
    typer.Argument(
        help="A CSV, gzipped CSV or Parquet file; or array data under an array schema: an "
        ".npz, or a folder of images with one subfolder per class.",
        exists=True,
    ),
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
    parsed = load_schema(schema)
    if isinstance(parsed, ArraySchema):
        _inspect_arrays(file, parsed, json_output=json_output)
        return
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
        "outside_declared_range": report.out_of_range,
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


def _array_warnings(arrays: ArrayTable) -> list[str]:
    """What the user should fix about array data: undeclared arrays, values out of range."""
    warnings = []
    if arrays.undeclared:
        warnings.append(
            f"{arrays.source}: arrays not in the schema are left out (never read): "
            + ", ".join(arrays.undeclared)
        )
    if arrays.outside_range:
        low, high = arrays.arrays.value_range
        warnings.append(
            f"{arrays.source}: {arrays.outside_range} values lie outside the declared range "
            f"[{low:g}, {high:g}] and are clipped to it: widen arrays.value_range or correct "
            "the data"
        )
    return warnings


def _inspect_arrays(file: Path, schema: ArraySchema, *, json_output: bool) -> None:
    arrays = array_table(file, schema)
    doc: dict[str, Any] = {
        "records": len(arrays.frame),
        "kind": schema.kind,
        "shape": list(schema.shape),
        "value_range": list(schema.value_range),
        "label": schema.label,
        "classes": list(schema.label_names),
        "subject": schema.subject,
        "undeclared_excluded": arrays.undeclared,
        "values_outside_range": arrays.outside_range,
        "warnings": _array_warnings(arrays),
    }
    if json_output:
        print_json(doc)
        return
    table = Table(title=f"{file.name}: {doc['records']} records", title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("records", f"{schema.kind}, shape {tuple(schema.shape)} each")
    table.add_row("value range", f"[{schema.value_range[0]:g}, {schema.value_range[1]:g}]")
    table.add_row("label", f"{schema.label}: {', '.join(schema.label_names)}")
    table.add_row("subject (pseudonymized)", schema.subject or "-")
    table.add_row("undeclared: excluded", ", ".join(arrays.undeclared) or "-")
    out.print(table)
    for warning in doc["warnings"]:
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
    parsed = load_schema(schema)
    if isinstance(parsed, ArraySchema):  # the declared arrays, as a table of their values
        arrays = array_table(file, parsed)
        for warning in _array_warnings(arrays):
            err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
        dataset = SiteDataset.from_frame(
            ws,
            arrays.frame,
            arrays.schema,
            source=file.name,
            k=k,
            suppress=suppress,
            force=force,
            out=out_dir,
        )
    else:
        dataset = SiteDataset.from_file(
            ws, file, parsed, k=k, suppress=suppress, force=force, out=out_dir
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
    for warning in out_of_range_warnings(report.out_of_range, dataset.schema, report.rows_out):
        err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
