"""``insitu consent``: the site's consent registry (kept in its ledger, by pseudonym)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.data import ConsentRegistry, Pseudonymizer, Status
from insitu.workspace import Workspace

__all__ = ["consent_app"]

consent_app = typer.Typer(
    help=(
        "Consent per subject and purpose. Subjects are pseudonymized with the site key "
        "before anything is written; every change is a signed ledger entry. Training "
        "leaves out every record without a valid consent when a round starts."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(consent_app, name="consent", rich_help_panel="Data")

PurposeOption = Annotated[
    str, typer.Option("--purpose", "-p", help="e.g. training, inference-logging.")
]
SubjectArgument = Annotated[str, typer.Argument(help="The subject's id as the site knows it.")]


@contextmanager
def _registry(home: Path | None) -> Iterator[ConsentRegistry]:
    ws = Workspace.open(home)
    with ws.ledger() as ledger:
        yield ConsentRegistry(ledger, Pseudonymizer(ws.secret("pseudonym")))


@consent_app.command("import")
def import_command(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with columns subject,purpose,status.", exists=True, dir_okay=False
        ),
    ],
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Import consent changes from a CSV (status: granted or withdrawn); all or nothing.

    [dim]Example:[/] insitu consent import consents.csv
    """
    with _registry(home) as registry:
        counts = registry.import_csv(file)
    doc = {
        "imported": sum(counts.values()),
        "granted": counts["granted"],
        "withdrawn": counts["withdrawn"],
    }
    if json_output:
        print_json(doc)
    else:
        out.print(
            f"recorded {doc['imported']} consent changes "
            f"({doc['granted']} granted, {doc['withdrawn']} withdrawn)"
        )


def _change(
    subject: str, purpose: str, status: Status, home: Path | None, json_output: bool
) -> None:
    with _registry(home) as registry:
        change = registry.change(subject, purpose, status)
    if json_output:
        print_json(
            {
                "subject": change.subject,
                "purpose": change.purpose,
                "status": change.status,
                "time": change.time,
            }
        )
    else:
        out.print(f"consent {status} for {purpose} (subject {change.subject}) at {change.time}")


@consent_app.command("withdraw")
def withdraw(
    subject: SubjectArgument,
    purpose: PurposeOption,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Record that a subject withdrew consent for a purpose; effective from the next round.

    [dim]Example:[/] insitu consent withdraw P-10442 --purpose training
    """
    _change(subject, purpose, "withdrawn", home, json_output)


@consent_app.command("grant")
def grant(
    subject: SubjectArgument,
    purpose: PurposeOption,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Record that a subject granted consent for a purpose.

    [dim]Example:[/] insitu consent grant P-10442 --purpose training
    """
    _change(subject, purpose, "granted", home, json_output)


@consent_app.command("status")
def status(
    subject: Annotated[
        str | None, typer.Argument(help="One subject (else: counts per purpose).")
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show consent counts per purpose, or one subject's consent per purpose.

    [dim]Examples:[/] insitu consent status; insitu consent status P-10442 --json
    """
    with _registry(home) as registry:
        summary = registry.summary()
        token = registry.token(subject) if subject is not None else ""
        states = {p: registry.state(p).get(token, "none") for p in summary}
    if subject is not None:
        if json_output:
            print_json({"subject": token, "purposes": states})
            return
        for purpose, state in states.items():
            out.print(f"{purpose}: {state}")
        return
    if json_output:
        print_json(summary)
        return
    table = Table(title="Consent by purpose (subjects)", title_justify="left")
    for column in ("purpose", "granted", "withdrawn"):
        table.add_column(column)
    for purpose, counts in summary.items():
        table.add_row(purpose, str(counts["granted"]), str(counts["withdrawn"]))
    out.print(table)
