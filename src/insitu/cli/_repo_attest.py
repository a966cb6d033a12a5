"""``insitu repo attest`` and the attestation check of ``insitu repo publish``.

Kept apart from :mod:`insitu.cli.repo` (which registers the command): the repository's
attestation requirement is :mod:`insitu.update._attest`'s; this module parses and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.errors import UsageError
from insitu.workspace import Workspace

if TYPE_CHECKING:
    from insitu.attestation import Quote

__all__ = ["attest_command", "check_publish_attestation"]


def attest_command(
    repo: Annotated[Path, typer.Argument(help="Repository directory.", show_default=False)],
    require: Annotated[
        Path | None,
        typer.Option(
            "--require",
            metavar="ALLOWLIST",
            help="Require a fresh quote of every device, against this allow-list (copied).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop requiring attestation.")] = False,
    enroll: Annotated[
        str | None, typer.Option("--enroll", metavar="DEVICE", help="Enroll DEVICE's --ak.")
    ] = None,
    ak: Annotated[
        Path | None,
        typer.Option("--ak", help="The device's AK (PEM, 'insitu attest key').", exists=True),
    ] = None,
    challenge: Annotated[
        str | None,
        typer.Option("--challenge", metavar="DEVICE", help="Print a fresh nonce for DEVICE."),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Require a TPM quote of every device this repository publishes for; enroll their AKs.

    While required, [bold]repo publish[/] takes one --device and its --quote (over a nonce
    of [bold]--challenge[/]), checked against this allow-list and the AK enrolled here;
    a publish to a channel is refused. Every change is recorded in the ledger.

    [dim]Examples:[/]
      insitu repo attest /srv/models --require allow.toml
      insitu repo attest /srv/models --enroll 3f2a... --ak device.ak.pem
      insitu repo attest /srv/models --challenge 3f2a...
    """
    from insitu.update import device_attestation, set_device_attestation

    if require is not None and off:
        raise UsageError("--require and --off contradict each other; give one")
    if (enroll is None) != (ak is None):
        raise UsageError("--enroll DEVICE and --ak AK.pem go together")
    ws = Workspace.open(home)
    if require is not None or off:
        with ws.ledger() as ledger:
            set_device_attestation(repo, require, ledger=ledger)
    setting = device_attestation(repo)
    if setting is None and (enroll or challenge):
        raise UsageError(
            f"the repository {repo} does not require attestation; first: insitu repo attest "
            f"{repo} --require ALLOWLIST"
        )
    if setting is not None and enroll is not None and ak is not None:
        with ws.ledger() as ledger:
            setting.enroll(enroll, ak.read_bytes(), ledger=ledger)
    if setting is not None and challenge is not None:
        issued = setting.challenge(ws, challenge)
        if json_output:
            print_json({"device": challenge, "nonce": issued.nonce.hex(), "pcrs": issued.pcrs})
        else:
            out.print(issued.nonce.hex(), highlight=False)
        return
    pcrs = setting.allow_list.pcrs if setting else []
    states = [state.name for state in setting.allow_list.states] if setting else []
    devices = setting.enrolled() if setting else {}
    if json_output:
        print_json(
            {
                "repo": str(repo),
                "required": setting is not None,
                "pcrs": pcrs,
                "states": states,
                "devices": devices,
            }
        )
        return
    if setting is None:
        out.print(f"{repo}: attestation of devices is not required")
        return
    out.print(
        f"{repo}: every device must attest (PCRs {pcrs}; states {', '.join(states)}); "
        f"{len(devices)} device AK(s) enrolled"
    )


def check_publish_attestation(
    ws: Workspace,
    repo: Path,
    *,
    attest: Path | None,
    devices: list[str],
    channels: list[str] | None,
    quote: Path | None,
    ak: Path | None,
) -> None:
    """Refuse a publish the repository's requirement, or ``--attest``, does not allow."""
    from insitu.attestation import AllowList, Verifier
    from insitu.update import device_attestation

    setting = device_attestation(repo)
    if setting is None and attest is None:
        if quote is not None or ak is not None:
            raise UsageError("--quote and --ak go with --attest (or a repository that requires it)")
        return
    if setting is not None and (attest is not None or ak is not None):
        raise UsageError(
            f"the repository {repo} requires attestation with its own allow-list and enrolled "
            "keys ('insitu repo attest'); drop --attest and --ak"
        )
    parsed = _read_quote(quote)
    if setting is not None:
        setting.check_publish(ws, devices=devices, channels=channels or [], quote=parsed)
        return
    assert attest is not None
    if len(devices) != 1 or parsed is None or ak is None:
        raise UsageError("--attest checks one device: give one --device, its --quote and --ak")
    keys = {devices[0]: ak.read_bytes()}
    verifier = Verifier(ws, AllowList.load(attest), keys, kind="device", persistent=True)
    verifier.check(devices[0], parsed).raise_if_refused()


def _read_quote(quote: Path | None) -> Quote | None:
    from insitu.attestation import Quote

    if quote is None:
        return None
    try:
        return Quote.from_json(json.loads(quote.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{quote} is not a quote from 'insitu attest quote': {exc}") from exc
