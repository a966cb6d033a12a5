"""``insitu repo attest`` and the attestation check of ``insitu repo publish``.

Kept apart from :mod:`insitu.cli.repo` (which registers the command): the repository's
attestation requirement is :mod:`insitu.update._attest`'s; this module parses and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from insitu._atomic import atomic_write_bytes
from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.errors import UsageError
from insitu.workspace import Workspace

if TYPE_CHECKING:
    from insitu.attestation import Quote
    from insitu.update import DeviceAttestation

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
    ek_ca: Annotated[
        Path | None,
        typer.Option(
            "--ek-ca",
            metavar="CA.pem",
            help="With --require: bind each device's AK to its TPM's EK certificate, "
            "which must chain to these CAs (PEM). Without it, AKs are trusted on first use.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    ek_cert: Annotated[
        Path | None,
        typer.Option(
            "--ek-cert",
            help="With --challenge, when EK CAs are pinned: the device's EK certificate "
            "('insitu attest key --ek-cert').",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    ak_public: Annotated[
        Path | None,
        typer.Option(
            "--ak-public",
            help="With --challenge, when EK CAs are pinned: the device's AK public area "
            "('insitu attest key --ak-public').",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    credential_out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="CREDENTIAL",
            help="With --challenge, when EK CAs are pinned: write the credential (the nonce "
            "only the device's TPM recovers) here.",
            dir_okay=False,
        ),
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
      insitu repo attest /srv/models --require allow.toml --ek-ca tpm-vendors.pem
      insitu repo attest /srv/models --challenge 3f2a... --ek-cert ek.der \
          --ak-public ak.pub --out 3f2a.credential
    """
    from insitu.update import device_attestation, set_device_attestation

    if require is not None and off:
        raise UsageError("--require and --off contradict each other; give one")
    if (enroll is None) != (ak is None):
        raise UsageError("--enroll DEVICE and --ak AK.pem go together")
    if ek_ca is not None and require is None:
        raise UsageError("--ek-ca goes with --require ALLOWLIST (the two are set together)")
    ws = Workspace.open(home)
    if require is not None or off:
        with ws.ledger() as ledger:
            set_device_attestation(repo, require, ledger=ledger, ek_ca=ek_ca)
    setting = device_attestation(repo)
    if setting is None and (enroll or challenge):
        raise UsageError(
            f"the repository {repo} does not require attestation; first: insitu repo attest "
            f"{repo} --require ALLOWLIST"
        )
    if setting is not None and enroll is not None and ak is not None:
        with ws.ledger() as ledger:
            setting.enroll(enroll, ak.read_bytes(), ledger=ledger)
    bound = (ek_cert, ak_public, credential_out)
    if setting is not None and challenge is not None:
        _challenge(ws, setting, challenge, bound, json_output)
        return
    if any(given is not None for given in bound):
        raise UsageError("--ek-cert, --ak-public and --out go with --challenge DEVICE")
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


def _challenge(
    ws: Workspace,
    setting: DeviceAttestation,
    device: str,
    bound: tuple[Path | None, Path | None, Path | None],
    json_output: bool,
) -> None:
    """Issue ``device``'s nonce: in clear, or as a credential when EK CAs are pinned."""
    ek_cert, ak_public, out_file = bound
    if setting.ek_cas is None:
        if any(given is not None for given in bound):
            raise UsageError(
                f"--ek-cert, --ak-public and --out: the repository {setting.repo} pins no EK "
                "CA ('--require ALLOWLIST --ek-ca CA.pem'), its nonces are sent in clear"
            )
        issued = setting.challenge(ws, device)
        if json_output:
            print_json({"device": device, "nonce": issued.nonce.hex(), "pcrs": issued.pcrs})
        else:
            out.print(issued.nonce.hex(), highlight=False)
        return
    if ek_cert is None or ak_public is None or out_file is None:
        raise UsageError(
            f"the repository {setting.repo} binds AKs to certified EKs: give --ek-cert, "
            "--ak-public (from the device's 'insitu attest key --ek-cert EK --ak-public AK') "
            "and --out CREDENTIAL"
        )
    issued = setting.challenge(
        ws, device, ek_certificate=ek_cert.read_bytes(), ak_public=ak_public.read_bytes()
    )
    assert issued.credential is not None
    atomic_write_bytes(out_file, issued.credential)
    if json_output:
        print_json(
            {
                "device": device,
                "credential": str(out_file),
                "pcrs": issued.pcrs,
                "ek_fingerprint": issued.ek_fingerprint,
            }
        )
        return
    out.print(
        f"{out_file}: credential for device {device} (EK {issued.ek_fingerprint}); the "
        f"device runs 'insitu attest quote --credential {out_file.name}'"
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
