"""``insitu update`` and ``insitu rollback``: the device side of the supply chain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.errors import UsageError
from insitu.workspace import Workspace

__all__ = ["rollback", "update_app"]

update_app = typer.Typer(
    help=(
        "Update this device's model from a TUF repository: refresh signed metadata, "
        "download the delta (or the full bundle), verify, install into an A/B slot.\n\n"
        "[dim]Examples:[/]\n\n"
        "  insitu update enroll --root 1.root.json --url http://127.0.0.1:8080 --model triage\n\n"
        "  insitu update\n\n"
        "  insitu update --channel canary --json"
    ),
    rich_markup_mode="rich",
    invoke_without_command=True,
)
app.add_typer(update_app, name="update", rich_help_panel="Supply chain")


def _client(ws: Workspace) -> Any:
    from insitu.update import UpdateClient

    return UpdateClient(
        ws.update_dir,
        device_key=ws.encryption_key(),
        ledger=ws.ledger(),
        local_publisher=ws.signing_public_key,
    )


@update_app.callback()
def update(
    ctx: typer.Context,
    channel: Annotated[
        str | None, typer.Option(help="Channel to follow this time \\[default: enrolled one].")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only say what an update would install.")
    ] = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Update the model (when no sub-command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    ws = Workspace.open(home)
    client = _client(ws)
    try:
        with err_console.status("Refreshing signed metadata and downloading...", spinner="dots"):
            result = client.update(channel=channel, check_only=check)
    finally:
        if client.ledger is not None:
            client.ledger.close()
    if json_output:
        print_json(result)
        return
    if result["repaired"]:
        repaired = result["repaired"]
        out.print(
            f"[yellow]repaired[/] {escape(repaired['detail'])}; reinstalled from the repository "
            "(full download)"
        )
    _print_update(result)


def _print_update(result: dict[str, Any]) -> None:
    if result["status"] in ("up-to-date", "repaired"):
        out.print(f"{result['model']} {result['installed']} is up to date")
    elif result["status"] == "local":
        out.print(
            f"{result['model']} {result['installed']} (fine-tuned on this device) stays: the "
            f"repository offers {result['available']}, not a newer release"
        )
    elif result["status"] == "damaged":
        out.print(
            f"[red]damaged[/] {escape(result['damage']['detail'])}; run 'insitu update' to "
            "reinstall it from the repository"
        )
    elif result["status"] == "available":
        out.print(
            f"{result['model']} {result['available']} is available "
            f"(installed: {result['installed'] or 'nothing'}); run 'insitu update' to install it"
        )
    elif result["status"] == "held":
        out.print(
            f"{result['model']} {result['available']} was rolled back from on this device and "
            f"is held; {result['installed']} stays until a newer version is published"
        )
    else:
        before = result["installed_before"] or "nothing"
        out.print(
            f"[green]installed[/] {result['model']} {result['installed']} (was {before}; "
            f"{result['method']} download, slot {result['slot']})"
        )


@update_app.command("enroll")
def enroll(
    root: Annotated[Path, typer.Option(help="The repository's 1.root.json, obtained out of band.")],
    url: Annotated[str, typer.Option(help="Repository base URL (serves metadata/, targets/).")],
    model: Annotated[str, typer.Option(help="Name of the model this device runs.")],
    channel: Annotated[str, typer.Option(help="Channel to follow.")] = "stable",
    min_version: Annotated[
        str | None,
        typer.Option(
            help="Lowest version this device installs \\[default: what the channel offers now]."
        ),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Enroll this device with a repository: trust its root, remember URL and model.

    The version the channel offers now (or --min-version) becomes the device's floor:
    it never installs an older one, even if the channel is pointed back.

    [dim]Example:[/]
      insitu update enroll --root 1.root.json --url https://models.example --model triage
    """
    from insitu.bundle import device_key_id
    from insitu.update import UpdateClient

    ws = Workspace.open(home)
    try:
        root_bytes = root.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {root} ({exc.strerror or exc})") from exc
    keyid = device_key_id(ws.encryption_public_key)
    with ws.ledger() as ledger:
        config = UpdateClient.enroll(
            ws.update_dir,
            root=root_bytes,
            url=url,
            model=model,
            channel=channel,
            ledger=ledger,
            device_key_id=keyid,
            min_version=min_version,
            learn_floor=True,
        )
    summary = config.to_json() | {"device_key_id": keyid}
    if json_output:
        print_json(summary)
        return
    floor = f"floor {config.floor}" if config.floor else "no floor (the channel offers nothing yet)"
    out.print(
        f"[green]enrolled[/] for {model} on channel {channel}, {floor}; device key id {keyid}"
    )


@update_app.command("status")
def status(home: HomeOption = None, json_output: JsonOption = False) -> None:
    """Show the enrolled repository and both install slots.

    [dim]Example:[/] insitu update status --json
    """
    ws = Workspace.open(home)
    client = _client(ws)
    summary = client.status()
    client.ledger.close()
    if json_output:
        print_json(summary)
        return
    config = summary["config"]
    floor = f", floor {config['floor']}" if config.get("floor") else ""
    out.print(f"model {config['model']} on channel {config['channel']}{floor}")
    active = _slot_line(summary["active"], "run 'insitu update' to reinstall it")
    out.print(f"active:   {active}")
    out.print(f"previous: {_slot_line(summary['previous'], 'it cannot be rolled back to')}")


def _slot_line(slot: dict[str, Any] | None, hint: str) -> str:
    if slot is None:
        return "-"
    line = f"{slot['version']} (slot {slot['slot']})"
    if slot["damage"] is None:
        return line
    return f"{line} [red]DAMAGED[/]: {escape(slot['damage']['reason'])}; {hint}"


@app.command(rich_help_panel="Supply chain")
def rollback(home: HomeOption = None, json_output: JsonOption = False) -> None:
    """Return to the previously installed model (local, instant, no network).

    [dim]Example:[/] insitu rollback
    """
    ws = Workspace.open(home)
    client = _client(ws)
    try:
        result = client.rollback()
    finally:
        client.ledger.close()
    if json_output:
        print_json(result)
    else:
        out.print(
            f"[green]rolled back[/] {result['model']} to {result['active']} (was {result['was']})"
        )


# -- the TUF conformance suite's client protocol ---------------------------------------

tuf_app = typer.Typer(
    help=(
        "The client protocol of the TUF conformance suite (tuf-conformance CLIENT-CLI.md): "
        "init, refresh, download; exit 0 on success, 1 on any failure.\n\n"
        "[dim]Example:[/] insitu update tuf-client --metadata-dir /tmp/md init root.json"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
update_app.add_typer(tuf_app, name="tuf-client")


class _TufArgs:
    metadata_dir: Path
    metadata_url: str | None = None
    target_names: list[str] | None = None
    target_base_url: str | None = None
    target_dir: Path | None = None


@tuf_app.callback()
def tuf_client(
    metadata_dir: Annotated[Path, typer.Option(help="Trusted metadata directory.")],
    metadata_url: Annotated[str | None, typer.Option(help="Repository metadata URL.")] = None,
    target_name: Annotated[
        list[str] | None,
        typer.Option(help="Target path to download (repeat it: each is downloaded, in order)."),
    ] = None,
    target_base_url: Annotated[str | None, typer.Option(help="Targets base URL.")] = None,
    target_dir: Annotated[Path | None, typer.Option(help="Where downloads go.")] = None,
) -> None:
    """Options shared by the protocol's commands."""
    _TufArgs.metadata_dir = metadata_dir
    _TufArgs.metadata_url = metadata_url
    _TufArgs.target_names = target_name
    _TufArgs.target_base_url = target_base_url
    _TufArgs.target_dir = target_dir


def _need(value: Any, option: str) -> Any:
    if value is None:
        raise UsageError(f"{option} is required for this command")
    return value


@tuf_app.command("init")
def tuf_init_command(
    trusted_root: Annotated[Path, typer.Argument(help="Initial root.json.", exists=True)],
) -> None:
    """Trust TRUSTED_ROOT (no network)."""
    from insitu.update import tuf_init

    tuf_init(_TufArgs.metadata_dir, trusted_root)


@tuf_app.command("refresh")
def tuf_refresh_command() -> None:
    """Refresh top-level metadata with the TUF client workflow."""
    from insitu.update import tuf_refresh

    tuf_refresh(_TufArgs.metadata_dir, _need(_TufArgs.metadata_url, "--metadata-url"))


@tuf_app.command("download")
def tuf_download_command() -> None:
    """Download each --target-name, in order, verified, into --target-dir."""
    from insitu.update import tuf_download

    tuf_download(
        _TufArgs.metadata_dir,
        _need(_TufArgs.metadata_url, "--metadata-url"),
        _need(_TufArgs.target_names or None, "--target-name"),
        _need(_TufArgs.target_base_url, "--target-base-url"),
        _need(_TufArgs.target_dir, "--target-dir"),
    )
