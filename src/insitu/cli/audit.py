"""``insitu audit``: read, verify, export and prove the audit ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from rich.table import Table

from insitu._atomic import atomic_write_text
from insitu._signer import SigningPublicKey, public_key_text
from insitu.audit import (
    TreeHead,
    VerificationReport,
    check_proof,
    consistency_document,
    export_ledger,
    inclusion_document,
    verify_export,
)
from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.errors import KeyFileError, LedgerIntegrityError, MalformedLedgerError, UsageError
from insitu.workspace import Workspace

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help=(
        "The audit ledger: every training round, budget spent, model published, installed "
        "or rolled back, signed by this node and hash-chained.\n\n"
        "A data-protection officer verifies it with [bold]insitu audit verify[/], keeps a "
        "signed head elsewhere ([bold]insitu audit head[/]) and checks later that the log "
        "only grew."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(audit_app, name="audit", rich_help_panel="Governance")

HeadFileOption = Annotated[
    Path | None,
    typer.Option(
        "--head",
        help="A signed head kept elsewhere (from 'insitu audit head --out'): the ledger must "
        "still contain everything it covers.",
        exists=True,
        dir_okay=False,
    ),
]
PublicKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        help="PEM public key of the node (its keys/signing.pub.pem) to pin, instead of "
        "trusting the key inside the file.",
        exists=True,
        dir_okay=False,
    ),
]
OutOption = Annotated[
    Path | None, typer.Option("--out", "-o", help="Write to this file.", dir_okay=False)
]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MalformedLedgerError(f"{path} is not a readable {what} ({exc})") from exc


def _load_head(path: Path | None) -> TreeHead | None:
    return TreeHead.from_json(_read_json(path, "signed head")) if path else None


def _load_public_key(path: Path | None) -> SigningPublicKey | None:
    if path is None:
        return None
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key ({exc})") from exc
    if isinstance(key, Ed25519PublicKey) or (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise KeyFileError(
        f"{path} is not an Ed25519 or ECDSA P-256 public key (pass keys/signing.pub.pem)"
    )


def _write_or_print(doc: dict[str, Any], out_path: Path | None) -> None:
    if out_path:
        atomic_write_text(out_path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        print_json(doc)


def _report_json(report: VerificationReport, **extra: Any) -> dict[str, Any]:
    return {
        "ok": True,
        "entries": report.entries,
        "root": report.root.hex(),
        "heads_checked": report.heads_checked,
        "trusted_head_size": report.trusted_head_size,
        "seconds": round(report.seconds, 4),
    } | extra


@audit_app.command("log")
def log(
    home: HomeOption = None,
    event_type: Annotated[
        str | None,
        typer.Option(
            "--type", "-t", help="Only this event type, or a prefix ending in '.' (e.g. 'model.')."
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="From this UTC time (ISO 8601, e.g. 2026-11-01).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this UTC time (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries.")] = 20,
    json_output: JsonOption = False,
) -> None:
    """Show ledger entries, newest first.

    [dim]Examples:[/]
      insitu audit log --type model. --limit 5
      insitu audit log --since 2026-11-01 --json
    """
    with Workspace.open(home).ledger() as ledger:
        entries = ledger.entries(
            event_type=event_type, since=since, until=until, limit=limit, newest_first=True
        )
    if json_output:
        print_json(
            [
                {
                    "seq": e.seq,
                    "time": e.time,
                    "type": e.type,
                    "payload": e.payload,
                    "hash": e.hash.hex(),
                }
                for e in entries
            ]
        )
        return
    table = Table(
        title=f"Ledger entries ({len(entries)} shown, newest first)", title_justify="left"
    )
    for column in ("seq", "time (UTC)", "type", "payload"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(str(e.seq), e.time[:19].replace("T", " "), e.type, e.payload_json)
    out.print(table)


@audit_app.command("verify")
def verify(
    home: HomeOption = None,
    head: HeadFileOption = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Verify this export file instead of the workspace's ledger.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    public_key: PublicKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Verify the hash chain, every signature and every signed head; exit 1 on any failure.

    Prints the first bad sequence number when something was changed, deleted, reordered,
    re-signed or truncated; a ledger that is missing, empty, or lacks the entry
    [bold]insitu init[/] wrote fails at entry 1.

    [dim]Examples:[/]
      insitu audit verify
      insitu audit verify --head kept-head.json
      insitu audit verify --export ledger.jsonl --public-key signing.pub.pem
    """
    trusted = _load_head(head)
    pinned = _load_public_key(public_key)
    try:
        if export:
            result = verify_export(export, public_key=pinned, trusted_head=trusted)
            report, extra = result.report, {"node_id": result.node_id, "source": str(export)}
            if pinned is None and not json_output:
                err_console.print(
                    "[yellow]warning:[/] trusting the public key inside the export "
                    f"(node {result.node_id}); pin it with --public-key",
                    soft_wrap=True,
                )
        else:
            ws = Workspace.open(home)
            if pinned is not None and public_key_text(pinned) != public_key_text(
                ws.signing_public_key
            ):
                raise UsageError(
                    "--public-key is not this workspace's key; drop it or pass the right one"
                )
            with ws.ledger() as ledger:
                report = ledger.verify(trusted_head=trusted)
            extra = {"node_id": ws.node_id, "source": str(ws.ledger_path)}
    except LedgerIntegrityError as exc:
        if json_output:
            print_json(
                {
                    "ok": False,
                    "first_bad_seq": exc.seq,
                    "error": type(exc).__name__,
                    "message": str(exc),
                }
            )
        where = exc.seq if exc.seq is not None else "none found"
        raise type(exc)(
            f"verification FAILED (first bad entry: {where}): {exc}", seq=exc.seq
        ) from exc
    if json_output:
        print_json(_report_json(report, **extra))
        return
    out.print(
        f"[bold green]verified[/] {report.entries} entries of node {extra['node_id']}: chain, "
        f"signatures and {report.heads_checked} signed heads "
        + (f"(including the trusted head at size {report.trusted_head_size}) " if trusted else "")
        + f"in {report.seconds:.2f} s; root {report.root.hex()[:16]}..."
    )


@audit_app.command("head")
def head(
    home: HomeOption = None, out_path: OutOption = None, json_output: JsonOption = False
) -> None:
    """Sign a tree head over the whole ledger, to keep somewhere else.

    An auditor who keeps this head can later detect truncation or rewriting with
    [bold]insitu audit verify --head FILE[/] or a consistency proof.

    [dim]Example:[/] insitu audit head --out head-2026-11-22.json
    """
    with Workspace.open(home).ledger() as ledger:
        signed = ledger.sign_head()
    if out_path:
        _write_or_print(signed.to_json(), out_path)
        if not json_output:
            out.print(f"signed head at size {signed.size} written to {out_path}")
            return
    if json_output or not out_path:
        print_json(signed.to_json())


@audit_app.command("export")
def export(
    out_path: Annotated[
        Path, typer.Option("--out", "-o", help="The export file (JSON lines).", dir_okay=False)
    ],
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export the ledger with its public key and a fresh signed head, for verification elsewhere.

    [dim]Example:[/] insitu audit export --out ledger.jsonl
      and on another machine:
      insitu audit verify --export ledger.jsonl --public-key signing.pub.pem
    """
    ws = Workspace.open(home)
    with ws.ledger() as ledger:
        signed = export_ledger(ledger, out_path)
    doc = {
        "path": str(out_path),
        "entries": signed.size,
        "head": signed.to_json(),
        "node_id": ws.node_id,
    }
    if json_output:
        print_json(doc)
    else:
        out.print(f"exported {signed.size} entries of node {ws.node_id} to {out_path}")


@audit_app.command("prove")
def prove(
    seq: Annotated[
        int | None, typer.Argument(help="Prove that this entry is in the log.", min=1)
    ] = None,
    grown_from: Annotated[
        Path | None,
        typer.Option(
            "--grown-from",
            help="Prove that the log only grew since this older signed head.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    home: HomeOption = None,
    out_path: OutOption = None,
) -> None:
    """Write a Merkle proof document that others check without the ledger.

    [dim]Examples:[/]
      insitu audit prove 42 --out entry-42.proof.json          (inclusion)
      insitu audit prove --grown-from kept-head.json -o growth.json  (consistency)
    """
    if (seq is None) == (grown_from is None):
        raise UsageError(
            "give either an entry number (inclusion) or --grown-from HEAD (consistency)"
        )
    old_head = _load_head(grown_from)
    with Workspace.open(home).ledger() as ledger:
        if old_head is not None:
            doc = consistency_document(ledger, old_head)
        else:
            doc = inclusion_document(ledger, seq or 0)
    _write_or_print(doc, out_path)
    if out_path:
        err_console.print(f"proof written to {out_path}")


@audit_app.command("check-proof")
def check_proof_command(
    proof_file: Annotated[
        Path,
        typer.Argument(help="A document from 'insitu audit prove'.", exists=True, dir_okay=False),
    ],
    public_key: PublicKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Check a proof document offline, against the node's pinned public key.

    [dim]Example:[/] insitu audit check-proof entry-42.proof.json --public-key signing.pub.pem
    """
    checked = check_proof(_read_json(proof_file, "proof document"), _load_public_key(public_key))
    if json_output:
        print_json(
            {
                "ok": True,
                "kind": checked.kind,
                "node_id": checked.node_id,
                "summary": checked.summary,
            }
        )
        return
    if public_key is None:
        err_console.print(
            "[yellow]warning:[/] trusting the key inside the proof; pin it with --public-key"
        )
    out.print(
        f"[bold green]valid[/] {checked.kind} proof: {checked.summary} (node {checked.node_id})"
    )
