"""``insitu report``: the compliance report, built from ledgers and verified artefacts."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from insitu.cli._app import app
from insitu.cli._output import JsonOption, err_console, out, print_json

__all__ = ["report"]


@app.command(rich_help_panel="Governance")
def report(
    workspaces: Annotated[
        list[Path],
        typer.Argument(
            help="The quickstart's --out directory, or workspace homes (a coordinator's "
            "sites/* are included).",
            exists=True,
            file_okay=False,
        ),
    ],
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="The report file to write.", dir_okay=False)
    ],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="html (self-contained) or pdf (local Chromium).")
    ] = "html",
    allow_unverified: Annotated[
        bool,
        typer.Option(
            "--allow-unverified",
            help="Write the report even if a ledger or artefact fails verification, marked "
            "UNVERIFIED in red (exit 1 all the same).",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Write the compliance report: processing record, Annex IV items, data flows, privacy.

    Every ledger is verified and every artefact a ledger points to is checked against its
    digest first; tampered evidence is refused (exit 1, nothing written).

    [dim]Examples:[/]
      insitu report insitu-quickstart --out report.html
      insitu report insitu-quickstart --format pdf --out report.pdf
      insitu report /srv/coordinator /srv/site-a /srv/site-b -o report.html
    """
    from insitu.errors import UnverifiedEvidenceError
    from insitu.report import write_report

    command = "insitu report " + " ".join(shlex.quote(str(p)) for p in workspaces)
    command += f" --format {fmt} --out {shlex.quote(str(out_file))}"
    status = err_console.status("verifying ledgers and artefacts", spinner="dots")
    if json_output:
        written = write_report(
            workspaces, out_file, fmt=fmt, allow_unverified=allow_unverified, command=command
        )
    else:
        with status:
            written = write_report(
                workspaces, out_file, fmt=fmt, allow_unverified=allow_unverified, command=command
            )
    result = written.to_json() | {"out": str(out_file), "format": fmt}
    if json_output:
        print_json(result)
    elif written.evidence.verified:
        out.print(
            f"[bold green]verified[/]: {len(written.evidence.ledgers)} ledgers, "
            f"{len(written.evidence.artefacts)} artefacts; report written to {out_file}"
        )
    if not written.evidence.verified:
        raise UnverifiedEvidenceError(
            f"report written to {out_file} marked UNVERIFIED: "
            + "; ".join(written.evidence.problems[:3])
        )
