"""``insitu attest``: measure this insitu build into a TPM PCR, quote it, check a quote.

The prover's verbs (``key``, ``quote``) need a TPM (``INSITU_TPM_TCTI``) and tpm2-tools;
``digest`` and ``allow`` need neither; ``check`` runs a whole attestation against this
machine's TPM and records the decision in the workspace's ledger (docs/attestation.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from insitu._atomic import atomic_write_bytes, atomic_write_text
from insitu.attestation import (
    DEFAULT_PCR,
    AllowList,
    Decision,
    MeasuredState,
    Quote,
    Tpm,
    Verifier,
    ak_fingerprint,
    build_digest,
    expected_pcr,
)
from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, out, print_json
from insitu.errors import UsageError
from insitu.workspace import Workspace

__all__ = ["attest_app"]

attest_app = typer.Typer(
    help=(
        "Attested membership: measure this insitu build into a TPM PCR, quote it over a "
        "verifier's nonce, and check quotes against an allow-list of measured states."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(attest_app, name="attest", rich_help_panel="Supply chain")

PcrOption = Annotated[
    int, typer.Option("--pcr", min=0, max=23, help="The PCR the build is measured into.")
]
RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Measure the insitu package at this directory (default: the one running).",
        exists=True,
        file_okay=False,
    ),
]
SitePackagesOption = Annotated[
    bool,
    typer.Option(
        "--site-packages", help="Also measure every file of this environment's site-packages."
    ),
]
TctiOption = Annotated[
    str | None,
    typer.Option("--tcti", help="The TPM (default: $INSITU_TPM_TCTI), e.g. swtpm:port=2321."),
]


@attest_app.command("digest")
def digest_command(
    pcr: PcrOption = DEFAULT_PCR,
    root: RootOption = None,
    site_packages: SitePackagesOption = False,
    json_output: JsonOption = False,
) -> None:
    """Print this build's digest and the PCR value it gives once extended. No TPM needed.

    [dim]Example:[/] insitu attest digest
    """
    digest = build_digest(root, site_packages=site_packages)
    value = expected_pcr(digest)
    if json_output:
        print_json({"build": digest, "pcr": pcr, "value": value})
        return
    out.print(f"build {digest}\nPCR {pcr} after extending it: {value}")


@attest_app.command("allow")
def allow_command(
    out_file: Annotated[
        Path,
        typer.Option("--out", help="The allow-list (TOML) to write or add to.", dir_okay=False),
    ],
    name: Annotated[str, typer.Option("--name", help="A name for this measured state.")],
    pcr: PcrOption = DEFAULT_PCR,
    root: RootOption = None,
    site_packages: SitePackagesOption = False,
) -> None:
    """Add the measured state of this build (or of --root) to an allow-list.

    [dim]Example:[/] insitu attest allow --out allow.toml --name "insitu 0.9.0"
    """
    states = AllowList.load(out_file).states if out_file.exists() else ()
    if any(state.name == name for state in states):
        raise UsageError(f"{out_file} already has a state named {name!r}; choose another --name")
    value = expected_pcr(build_digest(root, site_packages=site_packages))
    allow_list = AllowList((*states, MeasuredState(name, {pcr: value})))
    atomic_write_text(out_file, allow_list.to_toml())
    out.print(f"{out_file}: {len(allow_list.states)} state(s); {name!r}: PCR {pcr} = {value}")


@attest_app.command("key")
def key_command(
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write the AK public key (PEM) here.", dir_okay=False),
    ] = None,
    ek_cert: Annotated[
        Path | None,
        typer.Option(
            "--ek-cert",
            help="Also write the TPM's EK certificate (DER) here, for a repository that "
            "binds AKs to certified EKs.",
            dir_okay=False,
        ),
    ] = None,
    ak_public: Annotated[
        Path | None,
        typer.Option(
            "--ak-public",
            help="Also write the AK's public area (TPM2B_PUBLIC) here, with --ek-cert.",
            dir_okay=False,
        ),
    ] = None,
    tcti: TctiOption = None,
) -> None:
    """Print this TPM's attestation key (created and persisted on first use), to enroll.

    The federation's operator saves it as [bold]<certs>/sites/NAME.ak.pem[/].

    [dim]Example:[/] insitu attest key --out hospital-a.ak.pem
    """
    tpm = Tpm(tcti)
    pem = tpm.ak_public_pem()
    if ek_cert is not None:
        atomic_write_bytes(ek_cert, tpm.ek_certificate())
    if ak_public is not None:
        atomic_write_bytes(ak_public, tpm.ak_public_area())
    if out_file is not None:
        atomic_write_bytes(out_file, pem)
        out.print(f"{out_file}: attestation key {ak_fingerprint(pem)}")
        return
    out.print(pem.decode(), end="", highlight=False)


@attest_app.command("quote")
def quote_command(
    nonce: Annotated[
        str | None, typer.Option("--nonce", help="The verifier's nonce (hex).")
    ] = None,
    credential: Annotated[
        Path | None,
        typer.Option(
            "--credential",
            help="The verifier's credential file instead of --nonce: this TPM recovers the "
            "nonce from it (only the TPM of the certified EK and this AK can).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    pcr: PcrOption = DEFAULT_PCR,
    root: RootOption = None,
    site_packages: SitePackagesOption = False,
    tcti: TctiOption = None,
) -> None:
    """Measure this build into --pcr and print the TPM's quote over --nonce (JSON).

    [dim]Examples:[/]
      insitu attest quote --nonce 00112233...
      insitu attest quote --credential 3f2a.credential
    """
    if (nonce is None) == (credential is None):
        raise UsageError("give the verifier's --nonce or its --credential (one of them)")
    tpm = Tpm(tcti)
    if credential is not None:
        challenge = tpm.activate(credential.read_bytes())
    else:
        try:
            challenge = bytes.fromhex(nonce or "")
        except ValueError as exc:
            raise UsageError("--nonce must be hex (the verifier's nonce)") from exc
    tpm.measure(build_digest(root, site_packages=site_packages), pcr=pcr)
    print_json(tpm.quote(challenge, [pcr]).to_json())


@attest_app.command("check")
def check_command(
    allow_list: Annotated[
        Path,
        typer.Option("--allow-list", help="The allowed measured states (TOML).", dir_okay=False),
    ],
    ak: Annotated[
        Path,
        typer.Option("--ak", help="The subject's enrolled AK public key (PEM).", exists=True),
    ],
    subject: Annotated[str, typer.Option("--subject", help="Who is checked.")],
    kind: Annotated[str, typer.Option("--kind", help="site or device.")] = "site",
    pcr: PcrOption = DEFAULT_PCR,
    root: RootOption = None,
    site_packages: SitePackagesOption = False,
    tcti: TctiOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Attest this machine's build to this workspace: measure, nonce, quote, check, record.

    A refusal is one line naming the PCR (exit 1); the decision is in the ledger as
    [bold]attestation.checked[/] either way.

    [dim]Example:[/] insitu attest check --allow-list allow.toml --ak site.ak.pem --subject a
    """
    if kind not in ("site", "device"):
        raise UsageError(f"--kind {kind!r}: site or device")
    ws = Workspace.open(home)
    verifier = Verifier(ws, AllowList.load(allow_list), {subject: ak.read_bytes()}, kind=kind)
    tpm = Tpm(tcti)
    tpm.measure(build_digest(root, site_packages=site_packages), pcr=pcr)
    challenge = verifier.challenge(subject)
    decision = verifier.check(subject, tpm.quote(challenge.nonce, challenge.pcrs))
    decision.raise_if_refused()
    if json_output:
        print_json(
            {"subject": subject, "kind": kind, "decision": "admitted", "pcrs": decision.pcrs}
        )
        return
    out.print(f"{kind} {subject}: admitted ({decision.reason}; PCRs {decision.pcrs})")


AllowListOption = Annotated[
    Path,
    typer.Option("--allow-list", help="The allowed measured states (TOML).", dir_okay=False),
]
KindOption = Annotated[str, typer.Option("--kind", help="site or device.")]


@attest_app.command("challenge")
def challenge_command(
    subject: Annotated[str, typer.Option("--subject", help="Who will quote (a device key id).")],
    allow_list: AllowListOption,
    kind: KindOption = "device",
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Issue a fresh nonce for SUBJECT (kept in this workspace, valid once, 120 s).

    The subject runs [bold]insitu attest quote --nonce N[/] and returns the JSON it
    prints; [bold]insitu attest verify[/] (or [bold]repo publish --attest[/]) checks it.

    [dim]Example:[/] insitu attest challenge --subject 3f2a... --allow-list allow.toml
    """
    verifier = _verifier(home, allow_list, {}, kind)
    challenge = verifier.challenge(subject)
    if json_output:
        print_json({"subject": subject, "nonce": challenge.nonce.hex(), "pcrs": challenge.pcrs})
        return
    out.print(challenge.nonce.hex(), highlight=False)


@attest_app.command("verify")
def verify_command(
    quote: Annotated[
        Path, typer.Argument(help="The quote (JSON from 'insitu attest quote').", exists=True)
    ],
    subject: Annotated[str, typer.Option("--subject", help="Who quoted.")],
    allow_list: AllowListOption,
    ak: Annotated[
        Path, typer.Option("--ak", help="The subject's enrolled AK public key (PEM).", exists=True)
    ],
    kind: KindOption = "device",
    home: HomeOption = None,
) -> None:
    """Check a quote against the nonce this workspace issued, the AK and the allow-list.

    A refusal is one line naming the PCR (exit 1); the decision is recorded either way.

    [dim]Example:[/] insitu attest verify q.json --subject 3f2a... --allow-list a.toml --ak d.pem
    """
    decision = _check_quote_file(
        home, quote, subject=subject, allow_list=allow_list, ak=ak, kind=kind
    )
    out.print(f"{kind} {subject}: admitted ({decision.reason}; PCRs {decision.pcrs})")


def _verifier(home: Path | None, allow_list: Path, keys: dict[str, bytes], kind: str) -> Verifier:
    if kind not in ("site", "device"):
        raise UsageError(f"--kind {kind!r}: site or device")
    ws = Workspace.open(home)
    return Verifier(ws, AllowList.load(allow_list), keys, kind=kind, persistent=True)


def _check_quote_file(
    home: Path | None, quote: Path, *, subject: str, allow_list: Path, ak: Path, kind: str
) -> Decision:
    """Check the quote in ``quote`` against this workspace's outstanding nonce; raise a refusal."""
    verifier = _verifier(home, allow_list, {subject: ak.read_bytes()}, kind)
    try:
        parsed = Quote.from_json(json.loads(quote.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{quote} is not a quote from 'insitu attest quote': {exc}") from exc
    decision = verifier.check(subject, parsed)
    decision.raise_if_refused()
    return decision
