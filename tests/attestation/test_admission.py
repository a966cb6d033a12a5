"""A deployed server admits a site only after a fresh quote of its measured build.

The server side is the real Fleet gateway of ``insitu federate server --attest`` (TLS,
the federation's certificates, the coordinator's ledger); the site side is the real
``insitu federate site`` (a modified build runs as its own process). No SuperLink is
needed to show admission: the gateway decides before any Fleet request reaches one.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.attestation import (
    DEFAULT_PCR,
    MAX_NONCES_PER_SUBJECT,
    AllowList,
    MeasuredState,
    Tpm,
    build_digest,
    expected_pcr,
)
from insitu.datasets import builtin_schema
from insitu.errors import (
    AttestationRequiredError,
    MeasurementMismatchError,
    NonceLimitError,
    StaleQuoteError,
)
from insitu.federated import FederationCerts, make_certs
from insitu.federated._attest import (
    CHALLENGE_PATH,
    QUOTE_PATH,
    SiteAdmission,
    attest_to_server,
    site_attestation_keys,
)
from insitu.federated._certs import load_site_public_key
from insitu.federated._gateway import FleetGateway, RunStates
from insitu.federated._processes import free_port
from insitu.federated._status import tls_context
from insitu.workspace import Workspace

from .conftest import modified_build


@dataclass
class Server:
    address: str
    certs: FederationCerts
    ws: Workspace
    digest: str  # the build the allow-list admits (the tree may be edited meanwhile)

    def checks(self) -> list[dict[str, object]]:
        with self.ws.ledger() as ledger:
            return [e.payload for e in ledger.entries(event_type="attestation.checked")]


@pytest.fixture
def server(tcti: str, coordinator: Workspace, tmp_path: Path) -> Iterator[Server]:
    """The gateway of a server started with --attest, hospital-a's AK enrolled."""
    certs = make_certs(tmp_path / "fed-certs", sites=["hospital-a"])
    (certs.directory / "sites" / "hospital-a.ak.pem").write_bytes(Tpm(tcti).ak_public_pem())
    registered = {name: load_site_public_key(p) for name, p in certs.site_publics().items()}
    digest = build_digest()
    allow = AllowList((MeasuredState("release", {DEFAULT_PCR: expected_pcr(digest)}),))
    admission = SiteAdmission(
        coordinator,
        allow,
        registered,
        site_attestation_keys(certs.directory / "sites", sorted(registered)),
        run="run-1",
    )
    port = free_port()
    gateway = FleetGateway(
        host="127.0.0.1",
        port=port,
        certfile=certs.server_cert,
        keyfile=certs.server_key,
        upstream=f"https://127.0.0.1:{free_port()}",  # no SuperLink: nothing should reach it
        upstream_ca=certs.ca,
        states=RunStates(),
        admission=admission,
    )
    with gateway:
        yield Server(f"127.0.0.1:{port}", certs, coordinator, digest)


def _fleet_request(server: Server) -> int:
    """A Fleet request carrying hospital-a's public key, as its SuperNode sends it."""
    private = serialization.load_ssh_private_key(
        server.certs.site_key("hospital-a").read_bytes(), None
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with httpx.Client(verify=tls_context(server.certs.ca)) as http:
        answer = http.post(
            f"https://{server.address}/v1/fleet/pull-messages",
            content=b"",
            headers={"flwr-public-key": base64.b64encode(pem).decode()},
        )
    return answer.status_code


def test_a_good_build_is_admitted_and_recorded(
    server: Server, tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _fleet_request(server) == 403  # not attested: never reaches the SuperLink
    monkeypatch.setenv("INSITU_TPM_TCTI", tcti)
    key = server.certs.site_key("hospital-a")
    assert attest_to_server(
        server.address, server.certs.ca, key, context=tls_context(server.certs.ca)
    )
    assert _fleet_request(server) == 503  # admitted: forwarded (no SuperLink behind it here)
    (entry,) = server.checks()
    assert (entry["subject"], entry["decision"], entry["run"]) == (
        "hospital-a",
        "admitted",
        "run-1",
    )


def test_attack_modified_build_attests(server: Server, tcti: str, tmp_path: Path) -> None:
    # hospital-a runs a copy of insitu with one byte added, as its own process, through
    # the real 'insitu federate site' (its TPM, its key, the server's CA).
    modified = modified_build(tmp_path)
    data = tmp_path / "hospital-a.csv"
    data.write_text("age\n1\n")
    env = {**os.environ, "PYTHONPATH": str(modified), "INSITU_TPM_TCTI": tcti}
    env["INSITU_PASSPHRASE"] = "attestation-tests"
    code = (
        "import sys, insitu; from insitu.cli import run; "
        "assert insitu.__file__.startswith(sys.argv[1]), insitu.__file__; "
        "sys.exit(run(sys.argv[2:]))"
    )
    proc = subprocess.run(
        [
            *(sys.executable, "-c", code, str(modified)),
            *("federate", "site", "--home", str(tmp_path / "site-a"), "--data", str(data)),
            *("-s", str(builtin_schema("adult")), "--ca", str(server.certs.ca)),
            *("--key", str(server.certs.site_key("hospital-a")), "--server", server.address),
            "--once",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "refused this site's attestation: site hospital-a refused: PCR 23 is" in line
    assert not (tmp_path / "site-a").exists()  # refused before anything was written
    (entry,) = server.checks()  # the coordinator's ledger records the refusal
    assert entry["decision"] == "refused"
    assert entry["pcr"] == 23
    assert entry["kind"] == "site"
    assert entry["measurement"] == expected_pcr(build_digest(modified / "insitu"))
    assert _fleet_request(server) == 403  # and its SuperNode is not let in


def test_attack_replayed_quote_at_the_server_is_refused(
    server: Server, tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[bytes] = []
    real_post = httpx.Client.post

    def keep(self: httpx.Client, url: str, **kw: object) -> httpx.Response:
        if url == QUOTE_PATH:
            sent.append(httpx.Request("POST", "https://x", json=kw["json"]).content)
        return real_post(self, url, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx.Client, "post", keep)
    monkeypatch.setenv("INSITU_TPM_TCTI", tcti)
    ca, key = server.certs.ca, server.certs.site_key("hospital-a")
    assert attest_to_server(server.address, ca, key, context=tls_context(ca))
    monkeypatch.setattr(httpx.Client, "post", real_post)
    with httpx.Client(verify=tls_context(ca)) as http:  # the recorded exchange, again
        # the site asks for a new nonce (its own signed request); the old quote is replayed
        fresh = http.post(
            f"https://{server.address}{CHALLENGE_PATH}", json=_signed_challenge(server)
        )
        assert fresh.status_code == 200
        again = http.post(f"https://{server.address}{QUOTE_PATH}", content=sent[0])
    assert again.status_code == 403
    assert again.json()["refusal"] == StaleQuoteError.__name__
    assert [e["decision"] for e in server.checks()] == ["admitted", "refused"]


def test_a_modified_build_is_refused_in_process_too(
    server: Server, tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSITU_TPM_TCTI", tcti)
    monkeypatch.setattr("insitu.federated._attest.build_digest", lambda: "ef" * 32)
    ca, key = server.certs.ca, server.certs.site_key("hospital-a")
    with pytest.raises(MeasurementMismatchError, match="PCR 23 is"):
        attest_to_server(server.address, ca, key, context=tls_context(ca))


def _site_process(
    server: Server, tmp_path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """The real 'insitu federate site' of hospital-a against ``server``, to its end."""
    data = tmp_path / "hospital-a.csv"
    data.write_text("age\n1\n")
    return subprocess.run(
        [
            *(sys.executable, "-c", "import sys; from insitu.cli import run; sys.exit(run())"),
            *("federate", "site", "--home", str(tmp_path / "site-a"), "--data", str(data)),
            *("-s", str(builtin_schema("adult")), "--ca", str(server.certs.ca)),
            *("--key", str(server.certs.site_key("hospital-a")), "--server", server.address),
            "--once",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_site_without_a_tpm_is_told_the_server_requires_attestation(
    server: Server, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INSITU_TPM_TCTI"}
    env["INSITU_PASSPHRASE"] = "attestation-tests"
    proc = _site_process(server, tmp_path, env)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line, not Flower's 403
    assert f"the server at {server.address} requires TPM attestation" in line
    assert "set INSITU_TPM_TCTI to this site's TPM" in line
    assert "403" not in line
    assert not (tmp_path / "site-a").exists()  # nothing written
    assert server.checks() == []  # nothing to check: no quote was sent
    assert _fleet_request(server) == 403


def test_a_site_without_a_tpm_is_refused_in_process_too(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INSITU_TPM_TCTI", raising=False)
    ca, key = server.certs.ca, server.certs.site_key("hospital-a")
    with pytest.raises(AttestationRequiredError, match=r"requires TPM attestation .*PCR 23"):
        attest_to_server(server.address, ca, key, context=tls_context(ca))


def test_a_server_without_attestation_asks_nothing_of_a_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certs(tmp_path / "fed-certs", sites=["hospital-a"])
    port = free_port()
    gateway = FleetGateway(
        host="127.0.0.1",
        port=port,
        certfile=certs.server_cert,
        keyfile=certs.server_key,
        upstream=f"https://127.0.0.1:{free_port()}",
        upstream_ca=certs.ca,
        states=RunStates(),
    )
    monkeypatch.delenv("INSITU_TPM_TCTI", raising=False)
    with gateway:
        with httpx.Client(verify=tls_context(certs.ca)) as http:
            answer = http.get(f"https://127.0.0.1:{port}{CHALLENGE_PATH}")
        assert answer.json() == {"attestation": "off"}
        key = certs.site_key("hospital-a")
        assert not attest_to_server(
            f"127.0.0.1:{port}", certs.ca, key, context=tls_context(certs.ca)
        )


def _signed_challenge(server: Server, *, stamp: int | None = None) -> dict[str, object]:
    """A challenge request as hospital-a's site signs it (its Flower key)."""
    private = serialization.load_ssh_private_key(
        server.certs.site_key("hospital-a").read_bytes(), None
    )
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    stamp = int(time.time()) if stamp is None else stamp
    proof = private.sign(
        b"insitu-attest-challenge-v1\x00" + str(stamp).encode(), ec.ECDSA(hashes.SHA256())
    )
    site_key = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return {"site_key": site_key.decode(), "time": stamp, "proof": base64.b64encode(proof).decode()}


def test_attack_nonce_flood_does_not_evict_a_real_site(
    server: Server, tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The attacker knows hospital-a's public key (it is no secret) and floods the
    # challenge route: unsigned, signed by another key, stale, and one real signed
    # request replayed. None of it is given a nonce, so nothing of the site's is taken.
    genuine = _signed_challenge(server)
    other = ec.generate_private_key(ec.SECP256R1())
    forged = dict(
        genuine,
        proof=base64.b64encode(
            other.sign(
                b"insitu-attest-challenge-v1\x00" + str(genuine["time"]).encode(),
                ec.ECDSA(hashes.SHA256()),
            )
        ).decode(),
    )
    url = f"https://{server.address}{CHALLENGE_PATH}"
    statuses: list[int] = []
    with httpx.Client(verify=tls_context(server.certs.ca)) as http:
        assert http.post(url, json=genuine).status_code == 200  # the one the attacker saw
        for _ in range(50):
            for body in (
                {"site_key": genuine["site_key"]},  # unsigned, as before this change
                forged,
                genuine,  # replayed
                _signed_challenge(server, stamp=int(time.time()) - 3600),  # stale
            ):
                statuses.append(http.post(url, json=body).status_code)
    assert set(statuses) == {403}
    monkeypatch.setenv("INSITU_TPM_TCTI", tcti)
    monkeypatch.setattr("insitu.federated._attest.build_digest", lambda: server.digest)
    ca, key = server.certs.ca, server.certs.site_key("hospital-a")
    assert attest_to_server(server.address, ca, key, context=tls_context(ca))
    assert _fleet_request(server) == 503  # admitted
    assert [e["decision"] for e in server.checks()] == ["admitted"]


def test_a_site_holding_too_many_nonces_is_answered_429(
    server: Server, tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"https://{server.address}{CHALLENGE_PATH}"
    with httpx.Client(verify=tls_context(server.certs.ca)) as http:
        answers = [
            http.post(url, json=_signed_challenge(server))
            for _ in range(MAX_NONCES_PER_SUBJECT + 1)
        ]
    assert [a.status_code for a in answers] == [200] * MAX_NONCES_PER_SUBJECT + [429]
    assert "site hospital-a has 4 nonces outstanding" in answers[-1].json()["error"]
    monkeypatch.setenv("INSITU_TPM_TCTI", tcti)
    ca, key = server.certs.ca, server.certs.site_key("hospital-a")
    with pytest.raises(NonceLimitError, match="holds too many nonces: site hospital-a has 4"):
        attest_to_server(server.address, ca, key, context=tls_context(ca))
