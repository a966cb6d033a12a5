"""``insitu keys``: where a workspace's keys live, and moving them into a token."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.workspace import Workspace, migrate_keys, pin_from_env

__all__ = ["keys_app", "migrate"]

keys_app = typer.Typer(
    help=(
        "The node's keys: move a workspace's file signing key into a PKCS#11 token "
        "(an HSM, a smart card, SoftHSM2, a TPM through tpm2-pkcs11)."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(keys_app, name="keys", rich_help_panel="Workspace")


@keys_app.command()
def migrate(
    key_uri: Annotated[
        str,
        typer.Option(
            help="Where the key goes: 'pkcs11:token=NAME;object=LABEL' (RFC 7512). The PIN "
            "comes from INSITU_PKCS11_PIN, or is asked for.",
        ),
    ],
    pkcs11_module: Annotated[
        str | None,
        typer.Option(help="The token's PKCS#11 library (e.g. /usr/lib/softhsm/libsofthsm2.so)."),
    ] = None,
    new_decryption_key: Annotated[
        bool,
        typer.Option(
            "--new-decryption-key",
            help="Also replace keys/encryption.key by a new decryption key made in the token "
            "(P-256 ECDH). Bundles already encrypted to the old key can no longer be opened "
            "here: enrol the new keys/encryption.pub.pem with the update repository.",
        ),
    ] = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Move this workspace's signing key from keys/signing.key into a PKCS#11 token.

    The same key is imported (sensitive, not extractable), so the node id and every
    verifier stay as they are. The token must sign with it before anything changes;
    then config.toml points to the token, the ledger records
    [bold]workspace.keys_migrated[/], and the key file is overwritten and removed. A
    sealed key file needs [bold]INSITU_PASSPHRASE[/]. Overwriting does not reach copies
    an SSD, a snapshot or a backup kept: a key generated in the token
    ([bold]insitu init --key-uri[/]) never existed outside it.

    The X25519 decryption key cannot enter a token (none has X25519):
    [bold]--new-decryption-key[/] makes a new one there instead, also for a workspace
    whose signing key is in a token already.

    [dim]Example:[/]
      insitu keys migrate --key-uri 'pkcs11:token=t;object=ward-7' --pkcs11-module libsofthsm2.so
    """
    ws = Workspace.open(home)
    pin = pin_from_env()
    if not pin and sys.stdin.isatty():
        pin = typer.prompt("PIN of the token", hide_input=True)
    done = migrate_keys(
        ws, key_uri, pkcs11_module=pkcs11_module, pin=pin, decryption=new_decryption_key
    )
    if json_output:
        print_json(
            {
                "home": str(ws.home.absolute()),
                "node_id": done.node,
                "keys": list(done.keys),
                "uri": done.uri,
                "module": done.module or None,
                "ledger_entry": done.seq,
                "destroyed": [f"keys/{name}" for name in done.destroyed],
                "replaced": list(done.replaced),
            }
        )
        return
    moved = " and ".join(f"{k} key" for k in done.keys)
    removed = ", ".join(f"keys/{name}" for name in done.destroyed) or "no key file"
    out.print(
        f"Moved the {moved} of node {done.node[:16]}... into {done.uri} (ledger entry "
        f"#{done.seq} workspace.keys_migrated); {removed} overwritten and removed."
    )
    if done.replaced:
        out.print(
            "The decryption key is a new key: bundles encrypted to the old one no longer "
            f"open here. Enrol {ws.keys_dir / 'encryption.pub.pem'} with the update "
            "repository that serves this node."
        )
    else:
        out.print("The bundle decryption key stays in keys/encryption.key.")
