"""``insitu optimize``: the smallest, fastest ONNX model that still meets the accuracy bar.

Candidates that learn from the ``--calibration`` records (int8-static, pruned, distilled)
are built only with ``--public-calibration``, a declaration that those records are public
data; the choice is recorded in the ledger linked to its source's run (ADR 0405).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.errors import ConstraintsNotMetError, WorkspaceNotFoundError
from insitu.workspace import Workspace

__all__ = ["optimize_command"]


def _workspace(home: Path | None, model: Path) -> Workspace | None:
    """The workspace to record in: ``--home``, the model directory's own, or none."""
    if home is not None:
        return Workspace.open(home)
    owner = model.parent.parent  # the home of <home>/models/<run id>
    if model.is_dir() and Workspace.layout(owner).model_dir(model.name) == model:
        with contextlib.suppress(WorkspaceNotFoundError):
            return Workspace.open(owner)
    with contextlib.suppress(WorkspaceNotFoundError):
        return Workspace.open(None)
    return None


def _model_path(model: str, ws: Workspace | None) -> Path:
    path = Path(model)
    if not path.exists() and ws is not None and ws.model_dir(model).is_dir():
        return ws.model_dir(model)  # a run id of this workspace
    return path


@app.command("optimize", rich_help_panel="Models")
def optimize_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A federated run's model directory (or its run id), a .pt2 "
            "(torch.export.save), a scikit-learn .pkl/.joblib, or an .onnx file."
        ),
    ],
    calibration: Annotated[
        Path,
        typer.Option(
            "--calibration",
            help="Records for calibration, fine-tuning and distillation (CSV/Parquet/.npz); "
            "learnt from only with --public-calibration.",
            dir_okay=False,
        ),
    ],
    evaluation: Annotated[
        Path,
        typer.Option(
            "--eval",
            help="Labelled records on which accuracy and parity are measured.",
            dir_okay=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory for model.onnx, candidates, report and plot."),
    ],
    target: Annotated[
        str,
        typer.Option(
            help="auto, fp32, int8-dynamic, int8-static, pruned, distilled, or a combination "
            "such as distilled+int8-static."
        ),
    ] = "auto",
    max_accuracy_drop: Annotated[
        float, typer.Option(min=0.0, help="Largest accuracy drop allowed, in points.")
    ] = 0.5,
    max_size: Annotated[
        float | None, typer.Option("--max-size", min=0.0, help="Largest model size, in MB.")
    ] = None,
    max_latency_ms: Annotated[
        float | None,
        typer.Option("--max-latency-ms", min=0.0, help="Largest p50 latency at batch 1 (ms)."),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(help="Distilled student: mlp:HIDDEN or cnn:CHANNELS \\[default: proposed]."),
    ] = None,
    label: Annotated[
        str | None,
        typer.Option(help="Label column of CSV data, for models without a data schema."),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer timing repetitions, shorter training.")
    ] = False,
    threads: Annotated[
        int, typer.Option(min=1, help="ONNX Runtime intra-op threads while measuring.")
    ] = 1,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Open a scikit-learn pickle (this runs code from the file)."
        ),
    ] = False,
    public_calibration: Annotated[
        bool,
        typer.Option(
            "--public-calibration",
            help="Declare the --calibration records public data (no site's subjects): only "
            "then are int8-static, pruned and distilled candidates, which learn from them, "
            "built. Recorded in the ledger with the data's SHA-256.",
        ),
    ] = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """The smallest ONNX model that meets the constraints, chosen by measurement here.

    Exports MODEL to ONNX, quantizes, prunes and distils it, measures every candidate on
    this machine, and keeps the smallest that meets the constraints and is no slower
    than fp32 at batch 1. Exits 1 when no candidate meets the constraints (the table and
    the report are still written).

    Without [bold]--public-calibration[/] nothing learns from the calibration records:
    only fp32 and int8-dynamic are built (private records would need DP-SGD charged to
    their subjects' budgets). The ledger entry links the choice to its source's run, so
    [bold]insitu bundle create[/] checks a stated epsilon against that run.

    [dim]Examples:[/]
      insitu optimize .insitu/models/RUN --calibration census.csv --public-calibration
          --eval held.csv --out opt/
      insitu optimize cnn.pt2 --calibration cal.npz --eval test.npz --out opt/
          --target int8-dynamic --max-accuracy-drop 1
    """
    from insitu.optimize import CANDIDATES, LEARNS_FROM_CALIBRATION, Constraints, optimize

    ws = _workspace(home, Path(model))
    path = _model_path(model, ws)
    constraints = Constraints(
        max_accuracy_drop=max_accuracy_drop, max_size_mb=max_size, max_latency_ms=max_latency_ms
    )
    built = [
        name
        for name in (CANDIDATES if target == "auto" else ("fp32", target))
        if public_calibration or name not in LEARNS_FROM_CALIBRATION
    ]
    total = 2 + 2 * len(built)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_output,
        transient=True,
    ) as progress:
        task = progress.add_task("optimizing", total=total)

        def on_step(text: str) -> None:
            progress.update(task, advance=1, description=text)

        report = optimize(
            path,
            calibration,
            evaluation,
            target=target,
            constraints=constraints,
            out_dir=out_dir,
            quick=quick,
            student=student,
            label=label,
            workspace=ws,
            allow_pickle=allow_pickle,
            threads=threads,
            on_step=on_step,
            public_calibration=public_calibration,
        )
    document = report.to_json()
    if json_output:
        print_json(document)
    else:
        _print_report(document)
    if report.chosen is None:
        raise ConstraintsNotMetError(
            f"{report.reason}; relax a constraint or give more calibration data "
            f"(report: {out_dir / 'report.json'})"
        )


def _print_report(report: dict[str, Any]) -> None:
    source = report["source"]
    table = Table(
        title=f"candidates for {source['name']} ({report['intra_op_threads']} thread)",
        title_justify="left",
    )
    for column in (
        "candidate",
        "size KiB",
        "p50 µs",
        "p99 µs",
        "rows/s @64",
        "accuracy",
        "drop pts",
        "max |diff|",
        "agree",
        "",
    ):
        table.add_column(
            column,
            justify="left" if column in {"candidate", ""} else "right",
            no_wrap=column == "candidate",
        )
    for c in report["candidates"]:
        if c.get("not_built_reason"):
            table.add_row(c["name"], *["-"] * 8, "[dim]not built[/]")
            continue
        if c["error"]:
            table.add_row(c["name"], *["-"] * 8, f"[red]failed: {c['error']}[/]")
            continue
        mark = ""
        if c["name"] == report["chosen"]:
            mark = "[bold green]chosen[/]"
        elif c["failures"]:
            mark = f"[yellow]{'; '.join(c['failures'])}[/]"
        elif c["slower_than_fp32"]:
            mark = "[dim]slower[/]"
        table.add_row(
            c["name"],
            f"{c['size_bytes'] / 1024:.1f}",
            f"{c['latency_p50_ms'] * 1000:.1f}",
            f"{c['latency_p99_ms'] * 1000:.1f}",
            f"{c['throughput_per_s']:,.0f}",
            "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.2f}%",
            f"{c['accuracy_drop_points']:+.2f}",
            "-" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.2e}",
            f"{100 * c['label_agreement']:.1f}%",
            mark,
        )
    out.print(table)
    _print_outcome(report)


def _print_outcome(report: dict[str, Any]) -> None:
    """The choice against fp32, the reason, what was not built, and where the files are."""
    ratios = report["chosen_vs_fp32"]
    if report["chosen"] is not None and ratios["size_reduction"] is not None:
        out.print(
            f"chosen {report['chosen']}: {ratios['size_reduction']:.1f}x smaller and "
            f"{ratios['speedup_p50']:.2f}x faster at batch 1 than fp32, accuracy drop "
            f"{ratios['accuracy_drop_points']:+.2f} pts"
        )
    out.print(report["reason"], soft_wrap=True, markup=False)
    skipped: dict[str, list[str]] = {}
    for c in report["candidates"]:
        if c.get("not_built_reason"):
            skipped.setdefault(c["not_built_reason"], []).append(c["name"])
    for reason, names in skipped.items():
        out.print(f"not built: {', '.join(names)}: {reason}", soft_wrap=True, markup=False)
    for note in report["notes"]:
        out.print(f"[dim]{note}[/]")
    learnt = report.get("provenance", {}).get("chosen_learnt_from")
    if learnt:
        out.print(f"the chosen model learnt from: {learnt}", soft_wrap=True, markup=False)
    where = report["out_dir"]
    ledger = f"; ledger entry {report['ledger_seq']}" if report["ledger_seq"] else ""
    out.print(f"report: {where}/report.json, plot: {where}/candidates.png{ledger}")
