"""``insitu repo``: the update repository (TUF metadata over bundles, deltas, channels)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.cli._repo_attest import attest_command, check_publish_attestation
from insitu.errors import UsageError
from insitu.workspace import Workspace, pin_from_env

__all__ = ["repo_app"]

repo_app = typer.Typer(
    help=(
        "The update repository: signed TUF metadata (root, targets, snapshot, timestamp) "
        "over bundles, per-tensor deltas and channels. It is a directory of static files: "
        "serve [bold]REPO/public[/] with any web server or CDN."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(repo_app, name="repo", rich_help_panel="Supply chain")

RepoArg = Annotated[Path, typer.Argument(help="Repository directory.", show_default=False)]


def _pin(repo: Path | None) -> str | None:
    """The token's PIN: INSITU_PKCS11_PIN, else asked for on a terminal (role keys in a token)."""
    from insitu.update import role_keys_in_token

    pin = pin_from_env()
    in_token = repo is None or role_keys_in_token(repo)
    if in_token and not pin and sys.stdin.isatty():
        pin = typer.prompt("PIN of the token", hide_input=True)
    return pin


@repo_app.command("init")
def init(
    repo: RepoArg,
    threshold: Annotated[
        int, typer.Option(min=1, max=9, help="Keys per role, all required to sign.")
    ] = 1,
    timestamp_days: Annotated[
        int, typer.Option(min=1, help="Days a timestamp stays valid (freeze protection).")
    ] = 1,
    key_uri: Annotated[
        str | None,
        typer.Option(
            help="Generate the role keys (ECDSA P-256) in a PKCS#11 token: "
            "'pkcs11:token=NAME;object=LABEL' (RFC 7512), one key per role labelled "
            "LABEL-<role>. The PIN comes from INSITU_PKCS11_PIN, or is asked for.",
        ),
    ] = None,
    pkcs11_module: Annotated[
        str | None,
        typer.Option(help="The token's PKCS#11 library (e.g. /usr/lib/softhsm/libsofthsm2.so)."),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a repository; this workspace's signing key becomes its trusted publisher.

    Devices are enrolled with [bold]REPO/public/metadata/1.root.json[/] (copy it to them
    out of band). Role keys go to [bold]REPO/keys[/], encrypted with INSITU_PASSPHRASE;
    with [bold]--key-uri[/] they are generated in a PKCS#11 token instead and every later
    signature (publish, timestamp, rotate) is made there.

    [dim]Examples:[/]
      insitu repo init /srv/models
      insitu repo init /srv/m --key-uri 'pkcs11:token=t;object=r' --pkcs11-module libsofthsm2.so
    """
    from insitu.update import init_directory_repository

    ws = Workspace.open(home)
    pin = _pin(None) if key_uri else None
    with ws.ledger() as ledger:
        repository = init_directory_repository(
            repo,
            publishers=[ws.signing_public_key],
            threshold=threshold,
            expiry_days={"timestamp": timestamp_days},
            ledger=ledger,
            key_uri=key_uri,
            pkcs11_module=pkcs11_module,
            pin=pin,
        )
    root = repo / "public" / "metadata" / "1.root.json"
    summary = {"repo": str(repo), "root": str(root), **repository.status()}
    if json_output:
        print_json(summary)
        return
    out.print(f"[green]created[/] update repository {repo}")
    out.print(
        f"enroll devices with: insitu update enroll --root {root} --url URL --model NAME",
        soft_wrap=True,
    )


@repo_app.command("publish")
def publish(
    repo: RepoArg,
    bundle: Annotated[Path, typer.Argument(help="A bundle file.", show_default=False)],
    channel: Annotated[
        list[str] | None, typer.Option(help="Channel to move to this version; repeat.")
    ] = None,
    device: Annotated[
        list[str] | None,
        typer.Option(help="Device key id to assign this version to (its own pointer); repeat."),
    ] = None,
    max_deltas: Annotated[
        int, typer.Option(min=0, help="Deltas from this many earlier versions.")
    ] = 2,
    attest: Annotated[
        Path | None,
        typer.Option(
            "--attest",
            metavar="ALLOWLIST",
            help="Publish to the one --device only if its --quote (over the nonce of "
            "'insitu attest challenge') shows a measured state this allow-list allows.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    quote: Annotated[
        Path | None,
        typer.Option(
            "--quote",
            help="The device's quote (with --attest, or when the repository requires it: "
            "'insitu repo attest').",
            exists=True,
        ),
    ] = None,
    ak: Annotated[
        Path | None,
        typer.Option("--ak", help="The device's enrolled AK, PEM (with --attest).", exists=True),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Publish a bundle: add it, deltas from earlier versions, and move pointers to it.

    [dim]Examples:[/]
      insitu repo publish /srv/models model-1.1.0.insb --channel canary
      insitu repo publish /srv/models model-1.1.0.insb --channel stable --channel canary
    """
    from insitu.update import open_directory_repository

    try:
        data = bundle.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read bundle {bundle} ({exc.strerror or exc})") from exc
    ws = Workspace.open(home)
    check_publish_attestation(
        ws, repo, attest=attest, devices=device or [], channels=channel, quote=quote, ak=ak
    )
    repository = open_directory_repository(repo, pin=_pin(repo))
    channels = channel if channel is not None else ([] if device else ["stable"])
    with ws.ledger() as ledger, err_console.status("Publishing (computing deltas)..."):
        result = repository.publish(
            data,
            channels=channels,
            devices=device or [],
            publisher_key=ws.encryption_key(),
            max_deltas=max_deltas,
            ledger=ledger,
        )
    if json_output:
        print_json(result)
        return
    out.print(
        f"[green]published[/] {result['name']} {result['version']} "
        f"({result['bundle_length']:,} bytes) to {', '.join(result['pointers'])}"
    )
    for old, info in result["deltas"].items():
        share = info["length"] / max(result["bundle_length"], 1)
        out.print(f"  delta from {old}: {info['length']:,} bytes ({share:.1%} of the bundle)")


repo_app.command("attest")(attest_command)


@repo_app.command("publishers")
def publishers(
    repo: RepoArg,
    add: Annotated[
        list[Path] | None, typer.Option(help="Publisher key to trust (PEM, Ed25519); repeat.")
    ] = None,
    remove: Annotated[
        list[str] | None, typer.Option(help="Key id of a publisher to revoke; repeat.")
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """List, add or revoke the keys allowed to sign bundles (a new root version).

    [dim]Examples:[/]
      insitu repo publishers /srv/models
      insitu repo publishers /srv/models --add new-publisher.pub.pem --remove 3f2a...
    """
    from insitu.bundle import publisher_key_id
    from insitu.cli.bundle import _publisher_key
    from insitu.update import open_directory_repository

    repository = open_directory_repository(
        repo, pin=_pin(repo) if add or remove else None, unlock=bool(add or remove)
    )
    current = {publisher_key_id(k): k for k in repository.publishers}
    if add or remove:
        wanted = dict(current)
        for keyid in remove or []:
            if keyid not in wanted:
                raise UsageError(f"no publisher with key id {keyid}; see 'insitu repo publishers'")
            del wanted[keyid]
        for path in add or []:
            key = _publisher_key(path)
            wanted[publisher_key_id(key)] = key
        with Workspace.open(home).ledger() as ledger:
            version = repository.set_publishers(wanted.values(), ledger=ledger)
        current = wanted
        if not json_output:
            out.print(f"root version {version} signed; devices pick it up at their next update")
    if json_output:
        print_json({"publishers": sorted(current), "root_version": repository.root().version})
    elif not (add or remove):
        for keyid in sorted(current):
            out.print(keyid)


@repo_app.command("rotate")
def rotate(
    repo: RepoArg,
    role: Annotated[
        str,
        typer.Argument(
            help="root, targets, assignments, snapshot or timestamp.", show_default=False
        ),
    ],
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Replace a role's keys by fresh ones (a new root or targets version).

    Devices follow the rotation at their next update. Do it when a key may have leaked,
    and on a schedule for the online keys (timestamp, snapshot, assignments).

    [dim]Example:[/] insitu repo rotate /srv/models timestamp
    """
    from insitu.update import rotate_directory_keys

    with Workspace.open(home).ledger() as ledger:
        repository = rotate_directory_keys(repo, role, ledger=ledger, pin=_pin(repo))
    summary = {"role": role, **repository.status()}
    if json_output:
        print_json(summary)
    else:
        out.print(
            f"[green]rotated[/] the {role} keys; root is now version "
            f"{summary['roles']['root']['version']}"
        )


@repo_app.command("timestamp")
def timestamp(repo: RepoArg, home: HomeOption = None, json_output: JsonOption = False) -> None:
    """Sign a fresh timestamp. Run it more often than timestamps expire (cron).

    [dim]Example:[/] insitu repo timestamp /srv/models   # e.g. hourly
    """
    from insitu.update import open_directory_repository

    with Workspace.open(home).ledger() as ledger:
        version = open_directory_repository(repo, pin=_pin(repo)).refresh_timestamp(ledger=ledger)
    if json_output:
        print_json({"timestamp_version": version})
    else:
        out.print(f"timestamp version {version} signed")


@repo_app.command("status")
def status(repo: RepoArg, json_output: JsonOption = False) -> None:
    """Show role versions and expiry, and what each channel runs.

    [dim]Example:[/] insitu repo status /srv/models --json
    """
    from insitu.update import open_directory_repository

    summary = open_directory_repository(repo, unlock=False).status()
    if json_output:
        print_json(summary)
        return
    table = Table(title=f"repository {repo}", title_justify="left")
    table.add_column("role / pointer", style="bold")
    table.add_column("version")
    table.add_column("expires")
    for role, info in summary["roles"].items():
        table.add_row(role, str(info["version"]), info["expires"])
    for pointer, version in summary["pointers"].items():
        table.add_row(pointer, version, "")
    out.print(table)


@repo_app.command("serve")
def serve(
    repo: RepoArg,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8080,
) -> None:
    """Serve REPO/public over HTTP for a lab or a demo (production: any web server).

    [dim]Example:[/] insitu repo serve /srv/models --port 8080
    """
    from insitu.update import make_server

    server = make_server(repo, host=host, port=port)
    out.print(f"serving {repo / 'public'} on http://{host}:{server.server_address[1]}/ (Ctrl-C)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
