"""``insitu init`` and ``insitu info``: create and describe a workspace."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from insitu._signer import algorithm_of
from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.workspace import Workspace, pin_from_env, resolve_home

__all__ = ["info", "init"]


def _keys_encrypted(ws: Workspace) -> bool:
    # Keys in a token have no file: the first sealed file present tells (data.key is made
    # at init since the site secrets came; older workspaces all have encryption.key). Site
    # secrets sealed to a token key ("token-...") say nothing of the passphrase.
    names = ("encryption.key", "data.key", "pseudonym.key", "model-signing.key")
    for path in (ws.keys_dir / n for n in names if (ws.keys_dir / n).exists()):
        protection = str(json.loads(path.read_text(encoding="utf-8")).get("protection"))
        if not protection.startswith("token-"):
            return protection != "none"
    return False


def describe(ws: Workspace) -> dict[str, Any]:
    """A JSON-able summary of a workspace."""
    with ws.ledger() as ledger:
        head = ledger.latest_head()
        size = len(ledger)
    return {
        "home": str(ws.home.absolute()),
        "node_id": ws.node_id,
        "name": ws.name,
        "keys_encrypted": _keys_encrypted(ws),
        "signing_key": ws.signing_key_uri or "file",
        "signing_algorithm": algorithm_of(ws.signing_public_key),
        "decryption_key": ws.decryption_key_uri or "file",
        "decryption_algorithm": ws.decryption_algorithm,
        "ledger": {
            "path": str(ws.ledger_path.absolute()),
            "entries": size,
            "latest_head": head.to_json() if head else None,
        },
    }


def _print_summary(summary: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("home", summary["home"])
    table.add_row("node id", summary["node_id"])
    table.add_row("name", summary["name"])
    table.add_row(
        "private keys",
        "encrypted (scrypt)" if summary["keys_encrypted"] else "[yellow]not encrypted[/]",
    )
    signing = summary["signing_key"]
    where = "keys/signing.key" if signing == "file" else f"in token {signing}"
    table.add_row("signing key", f"{where} ({summary['signing_algorithm']})")
    decrypting = summary["decryption_key"]
    table.add_row(
        "decryption key",
        "keys/encryption.key"
        if decrypting == "file"
        else f"in token {decrypting} ({summary['decryption_algorithm']})",
    )
    table.add_row("ledger entries", str(summary["ledger"]["entries"]))
    head = summary["ledger"]["latest_head"]
    table.add_row(
        "latest signed head",
        f"size {head['size']}, root {head['root'][:16]}..." if head else "none",
    )
    out.print(table)


@app.command(rich_help_panel="Workspace")
def init(
    home: HomeOption = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="A name for this node (a site, a device). [default: the parent directory's name]"
        ),
    ] = None,
    key_uri: Annotated[
        str | None,
        typer.Option(
            help="Generate the signing key in a PKCS#11 token: 'pkcs11:token=NAME;object=LABEL' "
            "(RFC 7512). The PIN comes from INSITU_PKCS11_PIN, or is asked for.",
        ),
    ] = None,
    pkcs11_module: Annotated[
        str | None,
        typer.Option(help="The token's PKCS#11 library (e.g. /usr/lib/softhsm/libsofthsm2.so)."),
    ] = None,
    key_algorithm: Annotated[
        str | None,
        typer.Option(
            help="The token key's algorithm: ed25519 or p256 (ECDSA P-256). [default: "
            "Ed25519 if the token has it, else P-256]",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Create a workspace: config, this node's keys, and its audit ledger.

    Keys are encrypted with the passphrase in [bold]INSITU_PASSPHRASE[/] when it is set.
    With [bold]--key-uri[/], the signing key is generated in a PKCS#11 token (an HSM, a
    smart card, SoftHSM2, a TPM through tpm2-pkcs11) and never leaves it: Ed25519 when
    the token has it, else ECDSA P-256 (a TPM), recorded in every signature.
    Running it again on an existing workspace changes nothing and says so.

    [dim]Examples:[/]
      insitu init
      INSITU_PASSPHRASE=... insitu init --home /srv/insitu --name ward-7
      insitu init --key-uri 'pkcs11:token=t;object=ward-7' --pkcs11-module libsofthsm2.so
    """
    pin = pin_from_env()
    if key_uri and not pin and sys.stdin.isatty():
        pin = typer.prompt("PIN of the token", hide_input=True)
    ws, created = Workspace.init(
        home,
        name=name,
        key_uri=key_uri,
        pkcs11_module=pkcs11_module,
        pin=pin,
        key_algorithm=key_algorithm,
    )
    summary = describe(ws) | {"created": created}
    if json_output:
        print_json(summary)
        return
    if created:
        # Unencrypted keys: Workspace.init has logged the warning (once per process).
        _print_summary(summary, "Workspace created")
    else:
        _print_summary(
            summary, f"Workspace already exists at {resolve_home(home)}: nothing changed"
        )


@app.command(rich_help_panel="Workspace")
def info(home: HomeOption = None, json_output: JsonOption = False) -> None:
    """Show this workspace: node id, key protection, ledger size and latest signed head.

    [dim]Example:[/] insitu info --json
    """
    summary = describe(Workspace.open(home))
    if json_output:
        print_json(summary)
    else:
        _print_summary(summary, "insitu workspace")
