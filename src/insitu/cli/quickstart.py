"""``insitu quickstart``: the first thing a newcomer runs.

Until federated training, bundles and the runtime land, this exercises what exists end to
end on the Adult census data insitu carries, the way a site and its auditor would: create
a workspace, prepare the data under its schema (minimized, pseudonymized, k-anonymous,
sealed), apply consent to a training round, and verify the evidence (the live ledger
against a kept head, an export against the pinned key, an inclusion and a consistency
proof).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from insitu.audit import (
    check_proof,
    consistency_document,
    export_ledger,
    inclusion_document,
    verify_export,
)
from insitu.cli._app import app
from insitu.cli._output import JsonOption, err_console, out, print_json
from insitu.data import ConsentRegistry, DataSchema, Pseudonymizer, SiteDataset, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.workspace import Workspace

__all__ = ["quickstart"]


@app.command(rich_help_panel="Start here")
def quickstart(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to create the demo workspace and its files.")
    ] = Path("insitu-quickstart"),
    json_output: JsonOption = False,
) -> None:
    """Run the whole job on the data insitu carries, and verify the evidence it leaves.

    [dim]Example:[/] insitu quickstart --out /tmp/demo
    """
    started = time.perf_counter()
    steps: list[tuple[str, str]] = []
    figures: dict[str, Any] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_output,
        transient=False,
    ) as progress:
        task = progress.add_task("quickstart", total=8)

        def step(description: str, result: str) -> None:
            steps.append((description, result))
            progress.update(task, advance=1, description=description)

        ws, created = Workspace.init(out_dir / "site", name="quickstart-site")
        step("workspace", f"{'created' if created else 'reused'} {ws.home} (node {ws.node_id})")
        with ws.ledger() as ledger:
            kept_head = ledger.sign_head()

        schema = DataSchema.load(builtin_schema("adult"))
        dataset = SiteDataset.from_file(
            ws, builtin_data("adult"), schema, suppress=True, out=ws.home / "prepared" / "adult"
        )
        report = dataset.prepared.report
        kanon = report.k_anonymity
        figures["data"] = {
            "rows_in": report.rows_in,
            "rows_released": report.rows_out,
            "rows_suppressed": report.rows_suppressed,
            "k": kanon["k_requested"],
            "smallest_class": kanon["smallest_class"],
            "dropped": report.dropped,
            "pseudonymized": report.pseudonymized,
        }
        step(
            "prepare",
            f"Adult: {report.rows_out} of {report.rows_in} rows released, sealed; "
            f"{', '.join(report.pseudonymized)} pseudonymized, {', '.join(report.dropped)} "
            f"dropped; {kanon['smallest_class']}-anonymous over "
            f"{', '.join(kanon['quasi_identifiers'])} ({report.rows_suppressed} rows suppressed)",
        )

        # The site's consent system says: everyone consented, one in a hundred withdrew.
        subjects = read_table(builtin_data("adult"))[schema.subject or ""].tolist()
        with ws.ledger() as ledger:
            registry = ConsentRegistry(ledger, Pseudonymizer(ws.secret("pseudonym")))
            registry.change_many([(s, "training", "granted") for s in subjects])
            registry.change_many([(s, "training", "withdrawn") for s in subjects[::100]])
        step("consent", f"{len(subjects)} subjects granted, {len(subjects[::100])} withdrew")

        round_data = dataset.for_round(round_number=1)
        figures["round"] = {
            "rows": round_data.rows,
            "excluded_without_consent": round_data.excluded_without_consent,
            "features": len(round_data.feature_names),
        }
        step(
            "training input",
            f"{round_data.rows} records x {len(round_data.feature_names)} features; "
            f"{round_data.excluded_without_consent} excluded (no consent); no identifier",
        )

        with ws.ledger() as ledger:
            verified = ledger.verify(trusted_head=kept_head)
            step(
                "verify",
                f"{verified.entries} entries, {verified.heads_checked} heads in "
                f"{verified.seconds:.2f} s",
            )
            export_path = out_dir / "ledger-export.jsonl"
            export_ledger(ledger, export_path)
            exported = verify_export(export_path, public_key=ws.signing_public_key)
            step(
                "export",
                f"{export_path}: {exported.report.entries} entries verified with the pinned key",
            )
            first = ledger.entries(event_type="data.prepared")[0]
            inclusion = check_proof(inclusion_document(ledger, first.seq), ws.signing_public_key)
            step("inclusion proof", inclusion.summary)
            growth = check_proof(consistency_document(ledger, kept_head), ws.signing_public_key)
            step("consistency proof", growth.summary)

    summary: dict[str, Any] = {
        "workspace": str(ws.home),
        "node_id": ws.node_id,
        "ledger_entries": verified.entries,
        "ledger_verified": True,
        "export": str(export_path),
        **figures,
        "steps": [{"step": s, "result": r} for s, r in steps],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if json_output:
        print_json(summary)
        return
    table = Table(title="insitu quickstart", title_justify="left")
    table.add_column("step", style="bold")
    table.add_column("result", overflow="fold")
    for description, result in steps:
        table.add_row(description, result)
    out.print(table)
    out.print(
        f"[bold green]all ledgers verified[/] in {summary['seconds']} s. "
        "Federated training, bundles and the local runtime join this job as they land."
    )
