"""``insitu report``: the compliance report of one run, and the declaration it reads.

``insitu report WORKSPACE... --out FILE`` is ``insitu report build WORKSPACE... --out FILE``:
the group hands arguments that name none of its commands to ``build`` (the report was a
single command before it had ``declare``, and scripts call it so).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import typer.core
from rich.markup import escape

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json

__all__ = ["build", "declare", "report_app"]


class _BuildByDefault(typer.core.TyperGroup):
    """``insitu report DIR ...`` runs ``build``; ``insitu report declare ...`` runs declare."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["build", *args]
        return super().parse_args(ctx, args)


report_app = typer.Typer(
    cls=_BuildByDefault,
    help=(
        "Write the compliance report: processing record, Annex IV items, data flows, "
        "privacy, for one federated run.\n\n"
        "[bold]insitu report WORKSPACE... --out FILE[/] is [bold]insitu report build[/]; "
        "[bold]insitu report declare[/] records the controller's declaration of processing "
        "(GDPR Art. 30) that the report reads."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(report_app, name="report", rich_help_panel="Governance")


@report_app.command("build")
def build(
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
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="The federated run to report on \\[default: the latest completed run]; a run "
            "refused on budget or failed is reported as such, with no headline figure.",
            show_default=False,
        ),
    ] = None,
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
    """Write the compliance report of one run: processing record, Annex IV, data flows, privacy.

    Every ledger is verified and every artefact a ledger points to is checked against its
    digest first; tampered evidence is refused (exit 1, nothing written). Every section is
    about the run (default: the latest completed one) and what the ledgers link to it.

    [dim]Examples:[/]
      insitu report insitu-quickstart --out report.html
      insitu report insitu-quickstart --format pdf --out report.pdf
      insitu report /srv/coordinator --run 20261207T181045Z-3c67ea -o report.html
    """
    from insitu.errors import UnverifiedEvidenceError
    from insitu.report import write_report

    command = "insitu report " + " ".join(shlex.quote(str(p)) for p in workspaces)
    command += f" --format {fmt} --out {shlex.quote(str(out_file))}"
    if run is not None:
        command += f" --run {shlex.quote(run)}"
    status = err_console.status("verifying ledgers and artefacts", spinner="dots")
    if json_output:
        written = write_report(
            workspaces,
            out_file,
            fmt=fmt,
            allow_unverified=allow_unverified,
            command=command,
            run=run,
        )
    else:
        with status:
            written = write_report(
                workspaces,
                out_file,
                fmt=fmt,
                allow_unverified=allow_unverified,
                command=command,
                run=run,
            )
    result = written.to_json() | {"out": str(out_file), "format": fmt}
    if json_output:
        print_json(result)
    elif written.evidence.verified:
        out.print(
            f"[bold green]verified[/]: {len(written.evidence.ledgers)} ledgers, "
            f"{len(written.evidence.artefacts)} artefacts; report of run {written.sections['run']} "
            f"({written.sections['status']['state']}) written to {out_file}"
        )
    if not written.evidence.verified:
        raise UnverifiedEvidenceError(
            f"report written to {out_file} marked UNVERIFIED: "
            + "; ".join(written.evidence.problems[:3])
        )


@report_app.command("declare")
def declare(
    controller: Annotated[
        str | None, typer.Option("--controller", help="Who decides the purposes and means.")
    ] = None,
    purposes: Annotated[
        list[str] | None,
        typer.Option("--purpose", help="A purpose of the processing (repeat for several)."),
    ] = None,
    data_subjects: Annotated[
        str | None, typer.Option("--data-subjects", help="The categories of data subjects.")
    ] = None,
    legal_basis: Annotated[
        str | None, typer.Option("--legal-basis", help="The legal basis (GDPR Art. 6, 9).")
    ] = None,
    recipients: Annotated[
        str | None, typer.Option("--recipients", help="The recipients of the personal data.")
    ] = None,
    transfers: Annotated[
        str | None, typer.Option("--transfers", help="Transfers to third countries, safeguards.")
    ] = None,
    retention: Annotated[
        str | None, typer.Option("--retention", help="Time limits for erasure.")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="A TOML file of the items (controller, purposes, data_subjects, legal_basis, "
            "recipients, transfers, retention); options override it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Declare the processing (GDPR Art. 30) in the coordinator's ledger, for the report.

    Recorded as [bold]processing.declared[/] only when it changes what the ledger holds;
    an item not given keeps its declared value, an empty one ("") withdraws it. The
    report's record of processing reads the latest declaration; what nobody declared
    reads "not declared".

    [dim]Examples:[/]
      insitu report declare --controller "Ward 7 Hospital" --purpose "triage model"
        --legal-basis "GDPR art. 9(2)(j)" --retention "5 years" --home /srv/coordinator
      insitu report declare --from declaration.toml --home /srv/coordinator
    """
    from insitu.errors import UsageError
    from insitu.report import ITEMS, declare_processing, load_declaration
    from insitu.workspace import Workspace

    items: dict[str, Any] = load_declaration(from_file) if from_file is not None else {}
    given = {
        "controller": controller,
        "purposes": purposes or None,
        "data_subjects": data_subjects,
        "legal_basis": legal_basis,
        "recipients": recipients,
        "transfers": transfers,
        "retention": retention,
    }
    items.update({k: v for k, v in given.items() if v is not None})
    if not items:
        raise UsageError(
            "nothing to declare: give --controller, --purpose, --data-subjects, --legal-basis, "
            "--recipients, --transfers, --retention or --from FILE.toml"
        )
    ws = Workspace.open(home)
    declared = declare_processing(ws, items)
    if json_output:
        print_json(declared.to_json() | {"workspace": ws.name})
        return
    if declared.entry is not None:
        out.print(
            f"[bold green]declared[/]: processing.declared #{declared.entry.seq} in the ledger "
            f"of {escape(ws.name)}"
        )
    else:
        out.print("[bold]unchanged[/]: the ledger already holds this declaration; nothing recorded")
    for item in ITEMS:
        value = declared.items.get(item)
        text = "; ".join(value) if isinstance(value, list) else value
        shown = escape(text) if text else "[dim]not declared[/]"
        out.print(f"  {item.replace('_', ' ')}: {shown}")
