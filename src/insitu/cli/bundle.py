"""``insitu bundle``: create, inspect and verify signed, encrypted model bundles.

Also: ``bom`` (the CycloneDX ML-BOM a verified bundle carries), ``export`` (its plain
files and OpenSSF model signature, for ``model_signing verify``) and ``oms-key`` (this
publisher's model-signing public key).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from rich.table import Table

from insitu._atomic import atomic_write_bytes
from insitu._signer import SigningPublicKey
from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.errors import KeyFileError, UsageError, WorkspaceNotFoundError, WrongDeviceKeyError
from insitu.workspace import Workspace

__all__ = ["bundle_app"]

bundle_app = typer.Typer(
    help=(
        "Model bundles: the ONNX model, its model card (schema, metrics, privacy figures, "
        "training provenance) and a manifest of digests, signed with this workspace's key "
        "and encrypted for the devices allowed to run it."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(bundle_app, name="bundle", rich_help_panel="Supply chain")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path} ({exc.strerror or exc})") from exc


def _profile(path: Path) -> dict[str, Any]:
    from insitu.drift import ReferenceProfile

    try:
        doc: dict[str, Any] = json.loads(_read(path, "drift reference"))
        ReferenceProfile.from_json(doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{path} is not a reference profile ({exc}); make it with 'insitu drift combine'"
        ) from exc
    return doc


def _public_key(path: Path, kind: type) -> Any:
    try:
        key = load_pem_public_key(_read(path, "public key"))
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key ({exc})") from exc
    if not isinstance(key, kind):
        wanted = "X25519 (keys/encryption.pub.pem)" if kind is X25519PublicKey else "Ed25519"
        raise KeyFileError(f"{path} is not an {wanted} public key")
    return key


def _publisher_key(path: Path) -> SigningPublicKey:
    """A publisher's (a node's) signing key: Ed25519, or P-256 (a key in a TPM)."""
    try:
        key = load_pem_public_key(_read(path, "public key"))
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key ({exc})") from exc
    if isinstance(key, Ed25519PublicKey) or (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise KeyFileError(
        f"{path} is not an Ed25519 or ECDSA P-256 public key; give a node's keys/signing.pub.pem"
    )


def _recipient_key(path: Path) -> Any:
    """A device's encryption key: X25519, P-256 (ECDH in a token) or RSA (OAEP in a TPM)."""
    try:
        key = load_pem_public_key(_read(path, "public key"))
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key ({exc})") from exc
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:  # the bundle format's floor
        raise KeyFileError(
            f"{path} is a {key.key_size}-bit RSA key; recipients need 2048 bits or more "
            "(give the device's keys/encryption.pub.pem)"
        )
    if isinstance(key, X25519PublicKey | rsa.RSAPublicKey) or (
        isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    ):
        return key
    raise KeyFileError(
        f"{path} is not an X25519, P-256 or RSA public key; give a device's keys/encryption.pub.pem"
    )


def _enrolled_publishers(ws: Workspace) -> list[SigningPublicKey]:
    """The publisher keys of the repository this device enrolled with (none if it did not)."""
    from insitu.update import UpdateClient

    return UpdateClient.enrolled_publishers(ws.update_dir)


def _parse_metrics(values: list[str]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or not math.isfinite(number):
            raise UsageError(f"--metric {item!r} must be NAME=NUMBER, e.g. --metric accuracy=0.91")
        metrics[name] = number
    return metrics


@bundle_app.command("create")
def create(
    model: Annotated[Path, typer.Argument(help="The ONNX model file.", show_default=False)],
    version: Annotated[str, typer.Option(help="Semantic version, e.g. 1.4.0.", show_default=False)],
    out_path: Annotated[
        Path, typer.Option("--out", help="Bundle file to write (.insb).", show_default=False)
    ],
    name: Annotated[
        str | None, typer.Option(help="Model name \\[default: the file name without suffix].")
    ] = None,
    recipient: Annotated[
        list[Path] | None,
        typer.Option(help="A device's keys/encryption.pub.pem allowed to run it; repeat."),
    ] = None,
    no_encrypt: Annotated[
        bool, typer.Option("--no-encrypt", help="Store the model in the clear (warned).")
    ] = False,
    metric: Annotated[
        list[str] | None, typer.Option(help="NAME=NUMBER for the model card; repeat.")
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(help="Privacy: epsilon spent (at least what the ledger records for its run)."),
    ] = None,
    delta: Annotated[float | None, typer.Option(help="Privacy: delta.")] = None,
    accountant: Annotated[str, typer.Option(help="Privacy: the accountant used.")] = "pld",
    data_schema: Annotated[
        Path | None, typer.Option(help="The data schema file; its SHA-256 goes in the card.")
    ] = None,
    description: Annotated[str, typer.Option(help="One paragraph for the card.")] = "",
    republishes: Annotated[
        str | None,
        typer.Option(help="This model is an earlier version published again; say which."),
    ] = None,
    drift_reference: Annotated[
        Path | None,
        typer.Option(help="The DP reference profile for drift monitoring (insitu drift combine)."),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    r"""Create a signed (and encrypted) bundle from an ONNX model.

    When this workspace's ledger records the federated run that exported this exact
    ONNX file, or the [bold]insitu optimize[/] step that chose it from such a run's model,
    the card's provenance names that run, its rounds and the optimization step, and the
    stated epsilon may not be smaller than the ledger's. A model the ledger does not trace
    to a private run can be bundled only without --epsilon. The publisher's own
    encryption key is always a recipient, so that [bold]insitu repo publish[/] can
    compute deltas.

    [dim]Examples:[/]
      insitu bundle create model.onnx --version 1.0.0 --out model-1.0.0.insb \
          --recipient ward7.pub.pem --metric auc=0.91 --epsilon 3 --delta 1e-5
      insitu bundle create old.onnx --version 1.2.1 --republishes 1.0.0 --out m.insb ...
    """
    from insitu.bundle import bundle_model

    recipients = [_recipient_key(p) for p in recipient or []]
    if not recipients and not no_encrypt:
        raise UsageError(
            "name the devices allowed to run this model with --recipient PEM (their "
            "keys/encryption.pub.pem), or pass --no-encrypt to ship it in the clear"
        )
    if (epsilon is None) != (delta is None):
        raise UsageError("give --epsilon and --delta together (or neither)")
    ws = Workspace.open(home)
    data = _read(model, "model")
    with err_console.status("Signing and encrypting the bundle...", spinner="dots"):
        blob, bundle = bundle_model(
            ws,
            data,
            name=name or model.stem.lower(),
            version=version,
            recipients=recipients,
            encrypt=not no_encrypt,
            metrics=_parse_metrics(metric or []),
            epsilon=epsilon,
            delta=delta,
            accountant=accountant,
            data_schema_sha256=(
                hashlib.sha256(_read(data_schema, "data schema")).hexdigest()
                if data_schema
                else None
            ),
            description=description,
            republishes=republishes,
            drift_reference=_profile(drift_reference) if drift_reference else None,
        )
    atomic_write_bytes(out_path, blob)
    summary = {"path": str(out_path), "length": len(blob)} | bundle.summary()
    if json_output:
        print_json(summary)
        return
    out.print(
        f"[green]created[/] {out_path} ({len(blob):,} bytes): {bundle.name} {bundle.version}, "
        + (
            f"encrypted for {len(bundle.recipients)} keys"
            if bundle.encrypted
            else "[yellow]not encrypted[/]"
        )
    )


def _print_summary(summary: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    card = summary["card"]
    table.add_row("model", f"{summary['name']} {summary['version']}")
    table.add_row("bundle id", summary["bundle_id"])
    table.add_row("created", str(summary["created"]))
    table.add_row("publisher key", summary["publisher"])
    model = summary["files"]["model.onnx"]
    table.add_row("model.onnx", f"{model['length']:,} bytes, sha256 {model['sha256'][:16]}...")
    pay = summary["payload"]
    table.add_row(
        "encryption",
        f"{len(pay['recipients'])} recipients" if pay["encrypted"] else "[yellow]none[/]",
    )
    privacy = card.get("privacy")
    table.add_row(
        "privacy",
        f"epsilon {privacy['epsilon']}, delta {privacy['delta']} ({privacy['accountant']})"
        if privacy
        else "no differential privacy",
    )
    table.add_row("metrics", ", ".join(f"{k}={v}" for k, v in card["metrics"].items()) or "-")
    provenance = card["provenance"]
    rounds = provenance.get("training_rounds", [])
    table.add_row("training rounds", f"{len(rounds)} ledger entries")
    table.add_row(
        "trained by",
        f"federated run {provenance['run']}"
        if provenance.get("run")
        else "no federated run of the publisher's ledger",
    )
    step = provenance.get("optimized_from")
    if isinstance(step, dict):
        entry = step.get("optimization_entry")
        seq = entry.get("seq") if isinstance(entry, dict) else None
        table.add_row(
            "optimized",
            f"{step.get('method')} (ledger entry {seq}), learnt from {step.get('learnt_from')}",
        )
    if card.get("republishes"):
        table.add_row("republishes", card["republishes"])
    if summary.get("bom"):
        table.add_row("ML-BOM", "CycloneDX 1.6 (insitu bundle bom)")
    if summary.get("oms_key"):
        table.add_row(
            "OpenSSF signature",
            f"key sha256 {summary['oms_key'][:16]}... (insitu bundle export)",
        )
    if "verified" in summary:
        table.add_row("verified", summary["verified"])
    out.print(table)


@bundle_app.command("inspect")
def inspect(
    path: Annotated[Path, typer.Argument(help="A bundle file.", show_default=False)],
    json_output: JsonOption = False,
) -> None:
    """Show a bundle's manifest and model card (without verifying it).

    [dim]Example:[/] insitu bundle inspect model-1.0.0.insb --json
    """
    from insitu.bundle import Bundle

    summary = Bundle.parse(_read(path, "bundle")).summary()
    if json_output:
        print_json(summary | {"verified": False})
    else:
        _print_summary(summary, f"{path} (not verified: use 'insitu bundle verify')")


@bundle_app.command("verify")
def verify(
    path: Annotated[Path, typer.Argument(help="A bundle file.", show_default=False)],
    publisher: Annotated[
        list[Path] | None,
        typer.Option(
            help=(
                "Trusted publisher key (PEM) \\[default: this workspace's key and, on a "
                "device, the publisher keys it enrolled with]."
            )
        ),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Verify a bundle: signature, digests, and (if this device may) the decrypted model.

    Without --publisher, a device (one that ran 'insitu update enroll') trusts the
    publisher keys its repository's signed root lists, as 'insitu update' does.

    [dim]Examples:[/]
      insitu bundle verify model-1.0.0.insb
      insitu bundle verify model-1.0.0.insb --publisher publisher.pub.pem
    """
    from insitu.bundle import Bundle, BundleVerifier

    bundle = Bundle.parse(_read(path, "bundle"))
    ws: Workspace | None = None
    if publisher:
        keys: list[SigningPublicKey] = [_publisher_key(p) for p in publisher]
    else:
        ws = Workspace.open(home)
        keys = [ws.signing_public_key, *_enrolled_publishers(ws)]
    verifier = BundleVerifier(keys)
    verifier.verify(bundle)
    level = "signature and payload digest"
    if ws is None:
        try:
            ws = Workspace.open(home)
        except WorkspaceNotFoundError:
            ws = None  # no workspace, no device key: the model digest is not checked
    if ws is None and bundle.encrypted:
        level += " (model not decrypted: no workspace)"
    else:
        try:
            device_key = ws.encryption_key() if ws is not None and bundle.encrypted else None
            verifier.open(bundle, device_key)
            level = "signature, payload digest and decrypted model digest"
        except WrongDeviceKeyError:
            level += " (model not decrypted: this device is not a recipient)"
    summary = bundle.summary() | {"verified": level}
    if json_output:
        print_json(summary)
    else:
        _print_summary(summary, f"[green]verified[/] {path}")


PublisherOption = Annotated[
    list[Path] | None,
    typer.Option(
        help=(
            "Trusted publisher key (PEM) \\[default: this workspace's key and, on a "
            "device, the publisher keys it enrolled with]."
        )
    ),
]


def _trusted(publisher: list[Path] | None, home: Path | None) -> list[SigningPublicKey]:
    if publisher:
        return [_publisher_key(p) for p in publisher]
    ws = Workspace.open(home)
    return [ws.signing_public_key, *_enrolled_publishers(ws)]


def _print_bom(bom: dict[str, Any], path: Path) -> None:
    model = bom["metadata"]["component"]
    table = Table(title=f"[green]verified[/] ML-BOM of {path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("format", f"CycloneDX {bom['specVersion']}, {bom['serialNumber']}")
    table.add_row("model", f"{model['name']} {model['version']} ({model['type']})")
    for digest in model.get("hashes", []):
        table.add_row(digest["alg"], digest["content"])
    analysis = model.get("modelCard", {}).get("quantitativeAnalysis", {})
    for metric in analysis.get("performanceMetrics", []):
        table.add_row(metric["type"], f"{metric['value']} ({metric.get('slice', '')})")
    for component in bom.get("components", []):
        table.add_row(component["type"], f"{component['name']} {component.get('version', '')}")
    out.print(table)


@bundle_app.command("bom")
def bom(
    path: Annotated[Path, typer.Argument(help="A bundle file.", show_default=False)],
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write the BOM (bom.json) to this file.")
    ] = None,
    publisher: PublisherOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the CycloneDX 1.6 ML-BOM of a bundle, after verifying the bundle.

    The BOM lists the model (digests, model card with the measured figures), the data set
    (its schema digest, no data) and the packages the runtime loads. It is signed with
    the bundle; no extra package is needed to read it.

    [dim]Examples:[/]
      insitu bundle bom model-1.0.0.insb --out model-1.0.0.cdx.json
      insitu bundle bom model-1.0.0.insb --publisher publisher.pub.pem --json
    """
    from insitu.bundle import Bundle, BundleVerifier, verified_bom

    bundle = Bundle.parse(_read(path, "bundle"))
    document, raw = verified_bom(bundle, BundleVerifier(_trusted(publisher, home)))
    if out_path is not None:
        atomic_write_bytes(out_path, raw)
    if json_output:
        print_json(document)
    elif out_path is not None:
        out.print(f"[green]wrote[/] {out_path} (CycloneDX {document['specVersion']} ML-BOM)")
    else:
        _print_bom(document, path)


@bundle_app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="A bundle file.", show_default=False)],
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="New directory for the plain files.", show_default=False),
    ],
    publisher: PublisherOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    r"""Verify and decrypt a bundle; write its plain files and OpenSSF model signature.

    The directory holds model.onnx, card.json, bom.json, model.sig (an OpenSSF model
    signature: a Sigstore bundle with a DSSE envelope over an in-toto statement of the
    files' digests) and oms.pub.pem (the publisher's model-signing key), so that the
    model_signing package's own command checks it. The model is written decrypted (mode
    0600 in a 0700 directory): this workspace must be one of the bundle's recipients.

    [dim]Example:[/]
      insitu bundle export model-1.0.0.insb --out model-1.0.0
      model_signing verify key --signature model-1.0.0/model.sig \
          --public_key model-1.0.0/oms.pub.pem model-1.0.0
    """
    from insitu.bundle import Bundle, BundleVerifier, export_bundle

    bundle = Bundle.parse(_read(path, "bundle"))
    verifier = BundleVerifier(_trusted(publisher, home))
    ws = Workspace.open(home)
    device_key = ws.encryption_key() if bundle.encrypted else None
    summary = export_bundle(bundle, verifier, device_key, out_dir)
    if json_output:
        print_json(summary)
        return
    out.print(
        f"[green]exported[/] {bundle.name} {bundle.version} to {out_dir} "
        f"({', '.join(summary['files'])}); check it with:"
    )
    out.print(summary["verify"], soft_wrap=True, highlight=False)


@bundle_app.command("oms-key")
def oms_key(
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write the PEM to this file.")
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show this publisher's OpenSSF model-signing public key (ECDSA P-256, PEM).

    Made at the first bundle (or here) and recorded in the ledger with its fingerprint
    (workspace.model_signing_key); give it to whoever checks exported models with
    'model_signing verify key'.

    [dim]Example:[/] insitu bundle oms-key --out publisher-oms.pub.pem
    """
    ws = Workspace.open(home)
    pem = ws.model_signing_public_pem()
    if out_path is not None:
        atomic_write_bytes(out_path, pem)
    fingerprint = hashlib.sha256(pem).hexdigest()
    if json_output:
        print_json({"public_key": pem.decode("ascii"), "fingerprint": fingerprint})
    elif out_path is not None:
        out.print(f"[green]wrote[/] {out_path} (sha256 of the PEM {fingerprint})")
    else:
        out.print(pem.decode("ascii").rstrip(), highlight=False)
