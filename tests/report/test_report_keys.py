"""The report says where each node's keys live and which sites attested, from the ledgers.

A quickstart's site moves its key into a SoftHSM2 token (``insitu keys migrate``) and the
coordinator's ledger records two attestation checks (through the event API, as the
verifier of ``insitu.attestation`` does): the report shows the token, the migration,
the admitted site and the refused one with the PCR that differed, each with its entry.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from insitu.audit import events
from insitu.cli import run
from insitu.report import build_report, collect_evidence, render_html
from insitu.report._keys import key_section
from insitu.workspace import Workspace
from tests.workspace.test_pkcs11 import MODULE, softhsm, token, uri_of

__all__ = ["softhsm", "token"]  # the SoftHSM2 fixtures of tests/workspace/test_pkcs11

TPM_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"


def _attest(ws: Workspace, subject: str, decision: str, **optional: Any) -> int:
    with ws.ledger() as ledger:
        entry = events.ATTESTATION_CHECKED.record(
            ledger, subject=subject, kind="site", decision=decision, pcrs=[0, 7, 23], **optional
        )
    return entry.seq


def test_report_shows_a_token_keyed_site_and_who_attested(
    quickstart: tuple[Path, dict[str, Any]],
    token: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = quickstart
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    coordinator = Workspace.open(copy / "coordinator")
    first, second = sorted(p.name for p in coordinator.sites_dir.iterdir())[:2]
    site = coordinator.site_home(first)
    args = ["keys", "migrate", "--home", str(site), "--key-uri", uri_of(token, first)]
    assert run([*args, "--pkcs11-module", MODULE]) == 0, capsys.readouterr().err
    admitted = _attest(coordinator, first, "admitted", ak_fingerprint="ab" * 32)
    refused = _attest(
        coordinator, second, "refused", pcr=7, reason="PCR 7 differs from every allowed state"
    )

    report = build_report([copy])
    assert report.evidence.verified, report.evidence.problems
    nodes = {n["name"]: n for n in report.sections["keys"]["nodes"]}
    signing, decryption = nodes[first]["keys"]
    assert (signing["where"], signing["migrated"], signing["algorithm"]) == (
        "PKCS#11 token",
        True,
        "ed25519",
    )
    assert signing["uri"] == f"{uri_of(token, first)}?module-path={MODULE}"
    assert signing["sources"][-1].endswith("workspace.keys_migrated")
    assert (decryption["where"], decryption["file"]) == ("file", "keys/encryption.key")
    assert nodes[second]["keys"][0]["where"] == "file"
    attestation = report.sections["keys"]["attestation"]
    assert (attestation["admitted"], attestation["refused"]) == ([first], [second])
    (bad,) = [c for c in attestation["checks"] if not c["admitted"]]
    assert (bad["pcr"], bad["source"]) == (7, f"{coordinator.name} #{refused} attestation.checked")

    assert report.to_json()["keys"]["attestation"]["refused"] == [second]  # --json too
    html = render_html(report)
    assert "PKCS#11 token" in html
    assert f"{uri_of(token, first)}?module-path={MODULE}" in html
    assert f"#{admitted} attestation.checked" in html
    assert "PCR 7" in html
    assert "PCR 7 differs from every allowed state" in html
    # The command writes it: the evidence verifies after the migration.
    assert run(["report", str(copy), "--out", str(tmp_path / "r.html")]) == 0


def test_keys_made_in_a_token_and_a_tpm_are_named_from_the_ledger(
    token: str, tmp_path: Path
) -> None:
    in_token, _ = Workspace.init(
        tmp_path / "a", name="a", key_uri=uri_of(token), pkcs11_module=MODULE
    )
    in_file, _ = Workspace.init(tmp_path / "b", name="b")
    # What a migration into a TPM records (tpm2-pkcs11's module in the URI).
    tpm_uri = f"pkcs11:token=tpm;object=b?module-path={TPM_MODULE}"
    with in_file.ledger() as ledger:
        events.WORKSPACE_KEYS_MIGRATED.record(
            ledger,
            node=in_file.node_id,
            keys=["signing"],
            store="pkcs11",
            uris={"signing": tpm_uri},
            algorithms={"signing": "ecdsa-p256-sha256"},
        )
    nodes = {n["name"]: n for n in key_section(collect_evidence([in_token.home, in_file.home]))}
    signing, decryption = nodes["a"]["keys"]
    assert (signing["where"], signing["uri"], signing["migrated"]) == (
        "PKCS#11 token",
        uri_of(token),
        False,
    )
    assert (decryption["where"], decryption["algorithm"]) == ("PKCS#11 token", "p256-ecdh")
    assert [s.split(" ", 2)[::2] for s in signing["sources"]] == [["a", "workspace.init"]]
    tpm, file_decryption = nodes["b"]["keys"]
    assert (tpm["where"], tpm["algorithm"], tpm["migrated"]) == (
        "TPM 2.0 (tpm2-pkcs11)",
        "ecdsa-p256-sha256",
        True,
    )
    assert (file_decryption["where"], file_decryption["algorithm"]) == ("file", "x25519")
