"""Bundling a model from a workspace: card, provenance, ML-BOM, signatures, encryption.

The one code path behind ``insitu bundle create``, the quickstart and a device's
fine-tune: the model card's input/output schema is read from the ONNX graph, its
provenance from the workspace's ledger (``_provenance``), the CycloneDX ML-BOM from the
card and the ledger's audits (``_bom``); the plain files get an OpenSSF model signature
with the workspace's model-signing key (``_oms``), the bundle is signed with the
workspace key and encrypted for the recipients plus the publisher's own encryption key
(so that the repository can compute deltas), and ``bundle.created`` is recorded.

The BOM and the OMS signature need the ``sign`` extra (cyclonedx-python-lib,
model-signing): without it, creating a bundle fails with one line naming the extra, before
anything is written (ADR 0105).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from insitu.audit import events
from insitu.bundle._bom import build_bom, ledger_figures, require_sign_extra
from insitu.bundle._card import ModelCard, schema_of
from insitu.bundle._format import BOM_FILE, Bundle, create_bundle
from insitu.bundle._oms import sign_files, sign_files_in_token, token_key_for_oms
from insitu.bundle._provenance import provenance_for
from insitu.bundle._stream import RecipientKey
from insitu.errors import UsageError

if TYPE_CHECKING:
    from insitu.workspace import Workspace

__all__ = ["bundle_model"]


def bundle_model(
    workspace: Workspace,
    model: bytes,
    *,
    name: str,
    version: str,
    recipients: Iterable[RecipientKey] = (),
    encrypt: bool = True,
    metrics: dict[str, float] | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    accountant: str = "pld",
    data_schema_sha256: str | None = None,
    description: str = "",
    republishes: str | None = None,
    drift_reference: dict[str, Any] | None = None,
) -> tuple[bytes, Bundle]:
    """Build, sign and (unless ``encrypt`` is false) encrypt a bundle; record it.

    Raises:
        UsageError: no recipients while encrypting, or epsilon without delta.
        MissingDependencyError: the ``sign`` extra is not installed.

    """
    recipients = list(recipients)
    if encrypt and not recipients:
        raise UsageError(
            "name the devices allowed to run this model (their keys/encryption.pub.pem), "
            "or ship it unencrypted"
        )
    if (epsilon is None) != (delta is None):
        raise UsageError("give epsilon and delta together (or neither)")
    require_sign_extra()
    inputs, outputs = schema_of(model)
    model_sha256 = hashlib.sha256(model).hexdigest()
    with workspace.ledger() as ledger:
        provenance = provenance_for(
            ledger,
            model_sha256=model_sha256,
            node=workspace.node_id,
            data_schema_sha256=data_schema_sha256,
            stated_epsilon=epsilon,
        )
    card = ModelCard(
        name=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        metrics=metrics or {},
        privacy=(
            {"epsilon": epsilon, "delta": delta, "accountant": accountant}
            if epsilon is not None
            else None
        ),
        provenance=provenance,
        description=description,
        republishes=republishes,
        drift_reference=drift_reference,
    )
    with workspace.ledger() as ledger:
        figures = ledger_figures(ledger, card, model_sha256)
    bom = build_bom(card, model, figures, publisher=f"insitu node {workspace.node_id}")
    signing_key = workspace.signing_key()
    # A P-256 key in a token signs the OMS statement there too (ADR 0021); otherwise
    # the workspace's model-signing key file does.
    in_token = token_key_for_oms(signing_key)
    oms_key = workspace.model_signing_key() if in_token is None else None
    if recipients:
        recipients.append(workspace.encryption_public_key)

    def oms_signer(files: dict[str, bytes]) -> dict[str, Any]:
        if in_token is not None:
            return sign_files_in_token(files, in_token, name=f"{name}-{version}")
        assert oms_key is not None
        return sign_files(files, oms_key, name=f"{name}-{version}")

    blob = create_bundle(
        model,
        card,
        signing_key,
        recipients=recipients,
        bom=bom,
        oms_signer=oms_signer,
    )
    bundle = Bundle.parse(blob)
    payload: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "bundle_id": bundle.bundle_id,
        "bundle_sha256": hashlib.sha256(blob).hexdigest(),
        "encrypted": bundle.encrypted,
        "recipients": len(bundle.recipients),
        "epsilon": epsilon,
        "bom_sha256": bundle.signed["files"][BOM_FILE]["sha256"],
        "oms_key": str(bundle.signed["oms"]["keyid"]),
    }
    if provenance.get("run"):
        payload["run"] = str(provenance["run"])  # the run behind the model: a report's link
    with workspace.ledger() as ledger:
        events.BUNDLE_CREATED.record(ledger, **payload)
    return blob, bundle
