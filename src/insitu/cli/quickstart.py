"""``insitu quickstart``: the first thing a newcomer runs.

Until federated training, bundles and the runtime land, this exercises what exists end to
end, the way a site and its auditor would: create a workspace, record signed events,
keep a signed head, export the ledger, and verify everything (the live ledger, the
export against the pinned key, an inclusion proof and a consistency proof).
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
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_output,
        transient=False,
    ) as progress:
        task = progress.add_task("quickstart", total=6)

        def step(description: str, result: str) -> None:
            steps.append((description, result))
            progress.update(task, advance=1, description=description)

        ws, created = Workspace.init(out_dir / "site", name="quickstart-site")
        step("workspace", f"{'created' if created else 'reused'} {ws.home} (node {ws.node_id})")

        with ws.ledger() as ledger:
            kept_head = ledger.sign_head()
            first = ledger.record("quickstart.started", insitu_step="placeholder", sites=1)
            for index in range(1, 4):
                ledger.record("quickstart.demo_round", round=index, accuracy=0.8 + index / 100)
            step("ledger", f"recorded 4 signed events; {len(ledger)} entries in all")

            report = ledger.verify(trusted_head=kept_head)
            step(
                "verify",
                f"{report.entries} entries, {report.heads_checked} heads in {report.seconds:.3f} s",
            )

            export_path = out_dir / "ledger-export.jsonl"
            export_ledger(ledger, export_path)
            exported = verify_export(export_path, public_key=ws.signing_public_key)
            step(
                "export",
                f"{export_path}: {exported.report.entries} entries verified with the pinned key",
            )

            inclusion = check_proof(inclusion_document(ledger, first.seq), ws.signing_public_key)
            step("inclusion proof", inclusion.summary)
            growth = check_proof(consistency_document(ledger, kept_head), ws.signing_public_key)
            step("consistency proof", growth.summary)

    summary: dict[str, Any] = {
        "workspace": str(ws.home),
        "node_id": ws.node_id,
        "ledger_entries": report.entries,
        "ledger_verified": True,
        "export": str(export_path),
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
