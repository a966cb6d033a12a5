"""A publisher whose P-256 signing key is in a PKCS#11 token makes its OMS signature there.

``model_signing``'s own PKCS#11 signer signs the OpenSSF model-signing statement with
the node's key in the token (SoftHSM2, the store of ``tests/workspace/test_pkcs11.py``):
no model-signing key file is made, and ``model_signing verify`` (the package's command,
another process) accepts the exported model with the node's public key; the same holds
for a node key in a TPM (swtpm and tpm2-pkcs11, ``tests/_swtpm.py``). A node whose token
key is Ed25519 keeps the model-signing key file (``model_signing`` signs with EC keys
only).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from insitu.bundle import Bundle, bundle_model
from insitu.bundle._oms import fingerprint
from insitu.workspace import Workspace
from tests._swtpm import MODULE as TPM_MODULE
from tests.bundle._models import mlp
from tests.bundle.test_bom_oms import _export, _oms_verify
from tests.workspace.test_pkcs11 import MODULE, softhsm, token, uri_of
from tests.workspace.test_tpm import label as tpm_label
from tests.workspace.test_tpm import tpm
from tests.workspace.test_tpm import uri_of as tpm_uri

__all__ = ["softhsm", "token", "tpm", "tpm_label"]  # fixtures, imported for the tests below


def _publish(ws: Workspace, tmp_path: Path) -> Path:
    blob, _ = bundle_model(
        ws, mlp([8, 16, 3])[0], name="mlp", version="1.0.0", recipients=[ws.encryption_public_key]
    )
    path = tmp_path / "mlp-1.0.0.insb"
    path.write_bytes(blob)
    return path


def test_a_p256_token_key_signs_the_oms_statement_in_the_token(token: str, tmp_path: Path) -> None:
    ws, _ = Workspace.init(
        tmp_path / "site", key_uri=uri_of(token), pkcs11_module=MODULE, key_algorithm="p256"
    )
    path = _publish(ws, tmp_path)
    pem = ws.signing_public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    oms = Bundle.parse(path.read_bytes()).oms
    assert oms is not None
    assert oms["public_key"].encode() == pem
    assert oms["keyid"] == fingerprint(pem)
    assert not (ws.keys_dir / "model-signing.key").exists()
    out = tmp_path / "exported"
    _export(ws, path, out)
    assert (out / "oms.pub.pem").read_bytes() == pem
    proc = _oms_verify(out, out / "oms.pub.pem")
    assert proc.returncode == 0, proc.stderr


def test_an_ed25519_token_key_keeps_the_model_signing_key_file(token: str, tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "site", key_uri=uri_of(token), pkcs11_module=MODULE)
    path = _publish(ws, tmp_path)
    oms = Bundle.parse(path.read_bytes()).oms
    assert oms is not None
    assert oms["keyid"] == fingerprint(ws.model_signing_public_pem())
    assert (ws.keys_dir / "model-signing.key").exists()


def test_a_tpm_key_signs_the_oms_statement_in_the_tpm(tpm_label: str, tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "site", key_uri=tpm_uri(tpm_label), pkcs11_module=TPM_MODULE)
    path = _publish(ws, tmp_path)
    pem = ws.signing_public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    oms = Bundle.parse(path.read_bytes()).oms
    assert oms is not None
    assert oms["keyid"] == fingerprint(pem)
    out = tmp_path / "exported"
    _export(ws, path, out)
    proc = _oms_verify(out, out / "oms.pub.pem")
    assert proc.returncode == 0, proc.stderr
