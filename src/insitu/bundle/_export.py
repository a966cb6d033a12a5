"""Reading a verified bundle's ML-BOM, and exporting its plain files for other tools.

Both start with insitu's own verification (:class:`BundleVerifier`): a BOM or a model is
handed out only from a bundle whose Ed25519 signature verified under a trusted publisher
key. Neither needs the ``sign`` extra: the BOM is JSON in the signed header, and the OMS
signature is written out as it was signed, for ``model_signing verify`` to check.

An export is a new directory (built beside its target, then renamed into place: a failed
export leaves nothing), mode 0700 because it holds the decrypted model::

    DIR/model.onnx  card.json  bom.json  model.sig  oms.pub.pem

``model_signing verify key --signature DIR/model.sig --public_key DIR/oms.pub.pem DIR``
accepts it; the signed statement lists ``model.sig`` and ``oms.pub.pem`` as ignored paths.
Checking the key is the verifier's part: its fingerprint is in the publisher's ledger
(``workspace.model_signing_key``) and in ``bundle.created`` (``oms_key``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from insitu._atomic import fsync_dir, refuse_symlink
from insitu._canonical import canonical_bytes
from insitu.bundle._format import BOM_FILE, Bundle
from insitu.bundle._oms import PUBLIC_KEY_FILE, SIGNATURE_FILE, fingerprint
from insitu.bundle._stream import DeviceKey
from insitu.bundle._verify import BundleVerifier
from insitu.errors import MalformedBundleError, UsageError

__all__ = ["export_bundle", "verified_bom", "verify_command"]


def verify_command(directory: Path) -> str:
    """The ``model_signing`` command line that checks an exported directory."""
    return (
        f"model_signing verify key --signature {directory / SIGNATURE_FILE} "
        f"--public_key {directory / PUBLIC_KEY_FILE} {directory}"
    )


def _checked(bundle: Bundle, name: str, data: bytes) -> bytes:
    entry = bundle.signed["files"].get(name)
    if not isinstance(entry, dict) or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise MalformedBundleError(
            f"bundle {bundle.name} {bundle.version}: {name} does not match the digest its "
            "signed manifest lists; ask the publisher to create the bundle again"
        )
    return data


def verified_bom(bundle: Bundle, verifier: BundleVerifier) -> tuple[dict[str, Any], bytes]:
    """The ML-BOM of a bundle that verifies: (the document, the exact ``bom.json`` bytes).

    Raises:
        BundleError: the bundle does not verify (see :class:`BundleVerifier`).
        UsageError: the bundle was made without a BOM.
        MalformedBundleError: the BOM differs from the digest the manifest lists.

    """
    verifier.verify(bundle)
    bom = bundle.bom
    if bom is None:
        raise UsageError(
            f"bundle {bundle.name} {bundle.version} carries no ML-BOM (it was created before "
            "insitu made one); create it again with 'insitu bundle create'"
        )
    return bom, _checked(bundle, BOM_FILE, canonical_bytes(bom))


def _plain_files(bundle: Bundle, model: bytes | bytearray) -> dict[str, bytes]:
    oms = bundle.oms
    if oms is None:
        raise UsageError(
            f"bundle {bundle.name} {bundle.version} carries no OpenSSF model signature (it "
            "was created before insitu made one); create it again with 'insitu bundle create'"
        )
    files = {
        "model.onnx": bytes(model),
        "card.json": _checked(bundle, "card.json", canonical_bytes(bundle.signed["card"])),
    }
    if bundle.bom is not None:
        files[BOM_FILE] = _checked(bundle, BOM_FILE, canonical_bytes(bundle.bom))
    if sorted(files) != oms.get("files") or oms["keyid"] != fingerprint(
        oms["public_key"].encode("ascii")
    ):
        raise MalformedBundleError(
            f"bundle {bundle.name} {bundle.version}: its OpenSSF signature names other files "
            "or another key than the bundle carries; ask the publisher to create it again"
        )
    files[SIGNATURE_FILE] = json.dumps(oms["signature"], indent=2).encode("utf-8") + b"\n"
    files[PUBLIC_KEY_FILE] = oms["public_key"].encode("ascii")
    return files


def export_bundle(
    bundle: Bundle,
    verifier: BundleVerifier,
    device_key: DeviceKey | None,
    directory: Path,
) -> dict[str, Any]:
    """Verify and decrypt ``bundle``; write its plain files and OMS signature to ``directory``.

    Raises:
        BundleError: the bundle does not verify or does not open with ``device_key``.
        UsageError: ``directory`` exists and is not empty, or the bundle has no OMS
            signature.

    """
    refuse_symlink(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"{directory} exists and is not an empty directory; choose a new --out")
    opened = verifier.open(bundle, device_key)
    files = _plain_files(bundle, opened.model)
    parent = directory.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))  # mode 0700
    try:
        for name, data in files.items():
            path = staging / name
            path.write_bytes(data)
            path.chmod(0o600 if name == "model.onnx" else 0o644)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        staging.rename(directory)
        fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    oms = bundle.oms or {}
    return {
        "directory": str(directory),
        "name": bundle.name,
        "version": bundle.version,
        "files": sorted(files),
        "oms_key": oms.get("keyid"),
        "verify": verify_command(directory),
    }
