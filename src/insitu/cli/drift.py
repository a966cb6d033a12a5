"""``insitu drift``: the DP reference profile (``release``, ``combine``) and ``status``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from insitu._atomic import atomic_write_text, refuse_symlink
from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.drift import drift_status
from insitu.errors import ConfigError, DataFormatError, SchemaError
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


@drift_app.command("release")
def release(
    data: Annotated[Path, typer.Option("--data", help="The site's training records.")],
    schema: Annotated[Path, typer.Option("--schema", "-s", help="The data schema (TOML).")],
    out_path: Annotated[Path, typer.Option("--out", help="Release file to write (JSON).")],
    epsilon: Annotated[
        float, typer.Option(help="Epsilon the release spends of the site's budget.")
    ] = 0.5,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="The trained ONNX model: adds its output histogram."),
    ] = None,
    bins: Annotated[int, typer.Option(help="Bins per numeric feature.")] = 10,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """At a site: noisy histograms of its records for the model's reference profile.

    The release is charged to the subjects of the records first (those without budget
    left are left out; refused and recorded when none remain); only noisy counts leave.

    [dim]Example:[/] insitu drift release --data ward7.csv -s adult.schema.toml --out r7.json
    """
    from insitu.data import DataSchema, SiteDataset, read_table
    from insitu.drift import ProfileLayout, release_profile

    if epsilon <= 0:
        raise ConfigError("--epsilon must be positive")
    refuse_symlink(out_path)  # before any budget is charged for a release it cannot write
    ws = Workspace.open(home)
    parsed = DataSchema.load(schema)
    frame = read_table(data)
    parsed.check_columns(frame.columns, source=str(data))
    records = SiteDataset.from_frame(ws, frame, parsed, source=str(data), k=1).for_round()
    outputs = None
    classes = 1
    if model is not None:
        from insitu._ort import create_session

        session = create_session(model.read_bytes(), intra_op_threads=1)
        name = session.get_inputs()[0].name
        outputs = session.run(None, {name: records.features})[0]
        classes = 1 if outputs.ndim == 1 or outputs.shape[-1] == 1 else int(outputs.shape[-1])
    layout = ProfileLayout.from_schema(parsed, bins=bins, output_classes=classes)
    doc = release_profile(
        ws,
        layout,
        records.features,
        outputs,
        subject_keys=records.subject_keys,
        dataset=parsed.name,
        epsilon=epsilon,
    )
    atomic_write_text(out_path, json.dumps(doc, sort_keys=True) + "\n")
    summary = {"out": str(out_path), "rows": records.rows, "epsilon": epsilon}
    if json_output:
        print_json(summary)
        return
    out.print(
        f"released noisy histograms of {records.rows:,} records to {out_path} "
        f"(epsilon {epsilon} charged to the subjects of these records)"
    )


@drift_app.command("combine")
def combine(
    releases: Annotated[list[Path], typer.Argument(help="The sites' release files.")],
    schema: Annotated[Path, typer.Option("--schema", "-s", help="The data schema (TOML).")],
    out_path: Annotated[Path, typer.Option("--out", help="Reference profile to write.")],
    json_output: JsonOption = False,
) -> None:
    """At the coordinator: sum the sites' noisy releases into the reference profile.

    Ship it in the model card: insitu bundle create ... --drift-reference profile.json

    [dim]Example:[/] insitu drift combine r*.json -s adult.schema.toml --out profile.json
    """
    from insitu.data import DataSchema
    from insitu.drift import ProfileLayout, combine_releases

    parsed = DataSchema.load(schema)
    docs = []
    for path in releases:
        try:
            docs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"cannot read the release {path} ({exc})") from exc
    layout = ProfileLayout.from_json(docs[0]["layout"])
    if layout.features != ProfileLayout.from_schema(parsed, bins=layout.bins).features:
        raise SchemaError(f"the releases were not made with {schema}; use the same schema")
    profile = combine_releases(layout, docs, schema=parsed.source)
    atomic_write_text(out_path, json.dumps(profile.to_json(), sort_keys=True) + "\n")
    summary = {"out": str(out_path), "sites": profile.sites, "epsilon": profile.epsilon}
    if json_output:
        print_json(summary)
        return
    out.print(f"reference profile of {profile.sites} sites written to {out_path}")
