"""A server started with ``--ek-ca`` admits a site only if its AK is bound to its TPM's EK.

The site's challenge request carries the TPM's EK certificate and the AK's public area;
the server checks the certificate against the pinned "vendor" CA (swtpm-localca's, as
in test_ek.py) and the AK against the enrolled one, and sends the nonce only inside a
credential (TPM2_MakeCredential) that the TPM holding that EK and that AK recovers. The
server side is the real Fleet gateway over HTTPS with the coordinator's ledger; the site
side is the library path of ``insitu federate site`` (:func:`attest_to_server`).
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.attestation import (
    DEFAULT_PCR,
    AllowList,
    MeasuredState,
    Tpm,
    build_digest,
    ek_fingerprint,
    expected_pcr,
    load_ek_cas,
)
from insitu.bundle import device_key_id
from insitu.errors import EkCertificateError, StaleQuoteError, TpmError, UsageError
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
from insitu.federated._superlink import _admission
from insitu.workspace import Workspace
from tests.update._cli import Site, invoke

from .conftest import provision_ek, snapshot

SITE = "hospital-a"


def _pinned(ca: Path) -> list[x509.Certificate]:
    """The vendor's CA certificates the operator pins (--ek-ca): root and issuer."""
    return [
        x509.load_pem_x509_certificate((ca / name).read_bytes())
        for name in ("swtpm-localca-rootca-cert.pem", "issuercert.pem")
    ]


@dataclass
class Server:
    address: str
    certs: FederationCerts
    ws: Workspace

    def checks(self) -> list[dict[str, object]]:
        with self.ws.ledger() as ledger:
            return [e.payload for e in ledger.entries(event_type="attestation.checked")]

    def context(self) -> object:
        return tls_context(self.certs.ca)

    def attest(self) -> bool:
        """hospital-a's join, as 'insitu federate site' runs it (INSITU_TPM_TCTI set)."""
        key = self.certs.site_key(SITE)
        return attest_to_server(self.address, self.certs.ca, key, context=self.context())

    def fleet(self) -> int:
        """A Fleet request with hospital-a's key: 403 unless admitted (503: no SuperLink)."""
        pem = (
            self._site_private()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        with httpx.Client(verify=tls_context(self.certs.ca)) as http:
            answer = http.post(
                f"https://{self.address}/v1/fleet/pull-messages",
                content=b"",
                headers={"flwr-public-key": base64.b64encode(pem).decode()},
            )
        return answer.status_code

    def _site_private(self) -> ec.EllipticCurvePrivateKey:
        private = serialization.load_ssh_private_key(self.certs.site_key(SITE).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        return private

    def post(self, path: str, body: dict[str, object]) -> httpx.Response:
        with httpx.Client(verify=tls_context(self.certs.ca)) as http:
            return http.post(f"https://{self.address}{path}", json=body)

    def signed(self, **extra: object) -> dict[str, object]:
        """A challenge request signed with hospital-a's Flower key (the key is stolen
        only in the sense that the attacker *is* the site's operator)."""
        private, stamp = self._site_private(), int(time.time())
        proof = private.sign(
            b"insitu-attest-challenge-v1\x00" + str(stamp).encode(), ec.ECDSA(hashes.SHA256())
        )
        return {
            "site_key": self.site_key(),
            "time": stamp,
            "proof": base64.b64encode(proof).decode(),
            **extra,
        }

    def site_key(self) -> str:
        return (
            self._site_private()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )

    def nonce_proof(self, nonce: bytes) -> str:
        signed = self._site_private().sign(
            b"insitu-attest-v1\x00" + nonce, ec.ECDSA(hashes.SHA256())
        )
        return base64.b64encode(signed).decode()


@contextmanager
def _server(tmp_path: Path, ws: Workspace, enrolled_ak: bytes, vendor: Path) -> Iterator[Server]:
    """The gateway of 'federate server --attest ALLOW --ek-ca VENDOR', AK enrolled."""
    certs = make_certs(tmp_path / "fed-certs", sites=[SITE])
    (certs.directory / "sites" / f"{SITE}.ak.pem").write_bytes(enrolled_ak)
    registered = {name: load_site_public_key(p) for name, p in certs.site_publics().items()}
    allow = AllowList((MeasuredState("release", {DEFAULT_PCR: expected_pcr(build_digest())}),))
    admission = SiteAdmission(
        ws,
        allow,
        registered,
        site_attestation_keys(certs.directory / "sites", sorted(registered)),
        run="run-1",
        ek_cas=_pinned(vendor),
    )
    port = free_port()
    with FleetGateway(
        host="127.0.0.1",
        port=port,
        certfile=certs.server_cert,
        keyfile=certs.server_key,
        upstream=f"https://127.0.0.1:{free_port()}",  # no SuperLink: nothing should reach it
        upstream_ca=certs.ca,
        states=RunStates(),
        admission=admission,
    ):
        yield Server(f"127.0.0.1:{port}", certs, ws)


def test_a_site_whose_ak_is_bound_to_its_certified_ek_is_admitted(
    start_swtpm: Callable[..., str],
    coordinator: Workspace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vendor = tmp_path / "vendor-ca"
    tcti = start_swtpm("site", ek_ca=vendor)
    tpm = Tpm(tcti)
    monkeypatch.setenv("INSITU_TPM_TCTI", tcti)
    with _server(tmp_path, coordinator, tpm.ak_public_pem(), vendor) as server:
        with httpx.Client(verify=tls_context(server.certs.ca)) as http:
            asked = http.get(f"https://{server.address}{CHALLENGE_PATH}").json()
        assert asked == {"attestation": "required", "pcrs": [DEFAULT_PCR], "ek": "required"}
        # the nonce travels only inside the credential, never in clear
        answer = server.post(
            CHALLENGE_PATH,
            server.signed(
                ek_certificate=base64.b64encode(tpm.ek_certificate()).decode(),
                ak_public=base64.b64encode(tpm.ak_public_area()).decode(),
            ),
        ).json()
        assert "nonce" not in answer
        assert len(base64.b64decode(answer["credential"])) > 256  # the RSA-wrapped seed
        assert server.fleet() == 403
        assert server.attest()
        assert server.fleet() == 503  # admitted: forwarded (no SuperLink behind it here)
    (entry,) = server.checks()
    assert (entry["subject"], entry["decision"], entry["run"]) == (SITE, "admitted", "run-1")
    assert entry["ek_fingerprint"] == ek_fingerprint(tpm.ek_certificate())


def test_attack_ak_from_another_tpm_with_a_copied_ek_certificate_is_refused(
    start_swtpm: Callable[..., str],
    coordinator: Workspace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The attacker had the AK of its own TPM (B, even a genuine one of the same vendor)
    # enrolled as hospital-a's, and presents hospital-a's certified EK certificate (A's:
    # public, it is read from A's NV) so that B's AK passes for one resident with A's EK.
    vendor = tmp_path / "vendor-ca"
    real = Tpm(start_swtpm("hospital-a", ek_ca=vendor))
    attacker_tcti = start_swtpm("attacker", ek_ca=vendor)
    attacker = Tpm(attacker_tcti)
    copied = real.ek_certificate()
    monkeypatch.setattr(Tpm, "ek_certificate", lambda self: copied)
    monkeypatch.setenv("INSITU_TPM_TCTI", attacker_tcti)
    with _server(tmp_path, coordinator, attacker.ak_public_pem(), vendor) as server:
        # The join: the certificate chains, B's AK is the enrolled one, so a credential
        # comes back; B cannot activate it (it does not hold A's EK), so no nonce.
        with pytest.raises(TpmError, match="tpm2_activatecredential failed"):
            server.attest()
        # Not knowing the nonce, it quotes over a guess: refused, and recorded.
        guess = secrets.token_bytes(32)
        quote = attacker.quote(guess)
        body = {"site_key": server.site_key(), "quote": quote.to_json()}
        refused = server.post(QUOTE_PATH, {**body, "proof": server.nonce_proof(guess)})
        assert refused.status_code == 403
        assert refused.json()["refusal"] == StaleQuoteError.__name__
        # Sending A's AK with A's certificate instead: not the enrolled AK, refused at once.
        real_ak = base64.b64encode(real.ak_public_area()).decode()
        request = server.signed(ek_certificate=base64.b64encode(copied).decode(), ak_public=real_ak)
        mismatched = server.post(CHALLENGE_PATH, request)
        assert mismatched.status_code == 403
        assert mismatched.json()["refusal"] == EkCertificateError.__name__
        assert "is not its enrolled attestation key" in mismatched.json()["error"]
        assert server.fleet() == 403  # never admitted
    stale, wrong_ak = server.checks()
    assert stale["decision"] == "refused"
    assert "could not recover the nonce from the credential" in str(stale["reason"])
    assert wrong_ak["decision"] == "refused"
    assert wrong_ak["ek_fingerprint"] == ek_fingerprint(copied)
    assert "is not its enrolled attestation key" in str(wrong_ak["reason"])


def test_attack_ek_certificate_of_another_ca_is_refused(
    start_swtpm: Callable[..., str],
    coordinator: Workspace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vendor, rogue = tmp_path / "vendor-ca", tmp_path / "rogue-ca"
    (tmp_path / "unused").mkdir()
    provision_ek(tmp_path / "unused", vendor)  # the pinned vendor; this TPM is not its
    tcti = start_swtpm("site", ek_ca=rogue)
    tpm = Tpm(tcti)
    monkeypatch.setenv("INSITU_TPM_TCTI", tcti)
    with _server(tmp_path, coordinator, tpm.ak_public_pem(), vendor) as server:
        with pytest.raises(EkCertificateError) as refused:
            server.attest()
        assert server.fleet() == 403
    (line,) = str(refused.value).splitlines()
    assert "refused this site's attestation: site hospital-a refused: the EK certificate" in line
    assert "does not chain to a pinned CA" in line
    (entry,) = server.checks()
    assert entry["decision"] == "refused"
    assert entry["ek_fingerprint"] == ek_fingerprint(tpm.ek_certificate())
    assert "does not chain to a pinned CA" in str(entry["reason"])


def test_a_site_sending_no_ek_certificate_is_refused_by_a_binding_server(
    coordinator: Workspace, tmp_path: Path
) -> None:
    # An older site (or one hiding its TPM) asks for a nonce without EK and AK: no nonce.
    vendor = tmp_path / "vendor-ca"
    (tmp_path / "unused").mkdir()
    provision_ek(tmp_path / "unused", vendor)
    certs = make_certs(tmp_path / "fed-certs", sites=[SITE])
    registered = {name: load_site_public_key(p) for name, p in certs.site_publics().items()}
    allow = AllowList((MeasuredState("release", {DEFAULT_PCR: "00" * 32}),))
    admission = SiteAdmission(coordinator, allow, registered, {}, ek_cas=_pinned(vendor))
    server = Server("unused", certs, coordinator)
    status, answer = admission.challenge(server.signed())
    assert (status, answer["refusal"]) == (403, EkCertificateError.__name__)
    assert "no EK certificate and AK public area were sent" in answer["error"]
    assert "nonce" not in answer
    (entry,) = server.checks()
    assert entry["decision"] == "refused"


def test_a_server_without_ek_ca_warns_that_it_trusts_the_ak_on_first_use(
    coordinator: Workspace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = make_certs(tmp_path / "fed-certs", sites=[SITE])
    registered = {name: load_site_public_key(p) for name, p in certs.site_publics().items()}
    allow = tmp_path / "allow.toml"
    allow.write_text(AllowList((MeasuredState("release", {DEFAULT_PCR: "00" * 32}),)).to_toml())
    files = FederationCerts(certs.directory)
    with caplog.at_level(logging.WARNING, logger="insitu.federated._superlink"):
        admission = _admission(coordinator, allow, files, registered, run="r")
    assert admission is not None
    assert not admission.binds_ek
    assert any("trusts each site's AK on first use" in r.getMessage() for r in caplog.records)
    with pytest.raises(UsageError, match="--ek-ca binds the AKs of attested sites: give --attest"):
        _admission(coordinator, None, files, registered, run="r", ek_ca=allow)
    with pytest.raises(EkCertificateError, match="cannot read the pinned EK CA certificates"):
        load_ek_cas(allow)  # not PEM certificates


# --------------------------------------------------------------------------- devices


def _vendor_bundle(vendor: Path, tmp_path: Path) -> Path:
    """The vendor's CA certificates in one PEM file, as an operator pins them."""
    bundle = tmp_path / "tpm-vendors.pem"
    bundle.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in _pinned(vendor))
    )
    return bundle


def _device_files(capsys: pytest.CaptureFixture[str], tcti: str, folder: Path) -> list[str]:
    """'insitu attest key' on the device: its AK (PEM), EK certificate and AK public area."""
    folder.mkdir()
    args = [
        *("attest", "key", "--tcti", tcti, "--out", str(folder / "ak.pem")),
        *("--ek-cert", str(folder / "ek.der"), "--ak-public", str(folder / "ak.pub")),
    ]
    assert invoke(capsys, *args)[0] == 0
    return ["--ek-cert", str(folder / "ek.der"), "--ak-public", str(folder / "ak.pub")]


def test_a_device_bound_to_its_certified_ek_gets_its_bundle(
    start_swtpm: Callable[..., str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vendor = tmp_path / "vendor-ca"
    tcti = start_swtpm("device", ek_ca=vendor)
    site = Site.make(tmp_path, capsys)
    keyid = device_key_id(Workspace.open(site.device).encryption_public_key)
    release = snapshot(tmp_path) / "insitu"
    allow, credential = tmp_path / "allow.toml", tmp_path / "device.credential"
    allow_cmd = ["attest", "allow", "--out", str(allow), "--name", "release"]
    assert invoke(capsys, *allow_cmd, "--root", str(release))[0] == 0
    files = _device_files(capsys, tcti, tmp_path / "tpm-files")
    repo_attest = ["repo", "attest", str(site.repo), "--home", site.publisher]
    pin = ["--require", str(allow), "--ek-ca", str(_vendor_bundle(vendor, tmp_path))]
    enroll = ["--enroll", keyid, "--ak", str(tmp_path / "tpm-files" / "ak.pem")]
    assert invoke(capsys, *repo_attest, *pin, *enroll)[0] == 0

    code, _, err = invoke(capsys, *repo_attest, "--challenge", keyid)  # no nonce in clear
    assert code == 2
    assert "binds AKs to certified EKs: give --ek-cert" in err
    code, _, err = invoke(
        capsys, *repo_attest, "--challenge", keyid, *files, "--out", str(credential)
    )
    assert code == 0, err
    code, quote, err = invoke(
        capsys,
        *("attest", "quote", "--credential", str(credential), "--tcti", tcti),
        *("--root", str(release)),
    )
    assert code == 0, err
    (tmp_path / "q.json").write_text(quote)
    publish = [
        *("repo", "publish", str(site.repo), str(site.bundle("1.0.0")), "--device", keyid),
        *("--quote", str(tmp_path / "q.json"), "--home", site.publisher),
    ]
    code, _, err = invoke(capsys, *publish)
    assert code == 0, err
    with Workspace.open(site.publisher).ledger() as ledger:
        (check,) = [e.payload for e in ledger.entries(event_type="attestation.checked")]
        (setting,) = [e.payload for e in ledger.entries(event_type="repo.attestation_set")]
    assert check["decision"] == "admitted"
    ek = (tmp_path / "tpm-files" / "ek.der").read_bytes()
    assert check["ek_fingerprint"] == ek_fingerprint(ek)
    assert "ek_ca_sha256" in setting


def test_attack_device_ak_from_another_tpm_with_a_copied_ek_certificate_is_refused(
    start_swtpm: Callable[..., str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The attacker's TPM B has its AK enrolled for the device; it presents the real
    # device's (A's) EK certificate with B's AK public area.
    vendor = tmp_path / "vendor-ca"
    real_tcti = start_swtpm("device", ek_ca=vendor)
    attacker_tcti = start_swtpm("attacker", ek_ca=vendor)
    site = Site.make(tmp_path, capsys)
    keyid = device_key_id(Workspace.open(site.device).encryption_public_key)
    allow, credential = tmp_path / "allow.toml", tmp_path / "device.credential"
    assert invoke(capsys, "attest", "allow", "--out", str(allow), "--name", "release")[0] == 0
    real = _device_files(capsys, real_tcti, tmp_path / "real-files")
    attacker = _device_files(capsys, attacker_tcti, tmp_path / "attacker-files")
    repo_attest = ["repo", "attest", str(site.repo), "--home", site.publisher]
    pin = ["--require", str(allow), "--ek-ca", str(_vendor_bundle(vendor, tmp_path))]
    enroll = ["--enroll", keyid, "--ak", str(tmp_path / "attacker-files" / "ak.pem")]
    assert invoke(capsys, *repo_attest, *pin, *enroll)[0] == 0
    copied = [real[0], real[1], attacker[2], attacker[3]]  # A's EK cert, B's AK
    code, _, err = invoke(
        capsys, *repo_attest, "--challenge", keyid, *copied, "--out", str(credential)
    )
    assert code == 0, err
    quote = ["attest", "quote", "--credential", str(credential), "--tcti", attacker_tcti]
    code, _, err = invoke(capsys, *quote)
    assert code == 1
    assert err.count("\n") == 1, err
    assert "tpm2_activatecredential failed" in err
    # A quote over a guessed nonce is refused at publish, and recorded.
    guess = ["attest", "quote", "--nonce", secrets.token_hex(32), "--tcti", attacker_tcti]
    code, out, err = invoke(capsys, *guess)
    assert code == 0, err
    (tmp_path / "q.json").write_text(out)
    publish = [
        *("repo", "publish", str(site.repo), str(site.bundle("1.0.0")), "--device", keyid),
        *("--quote", str(tmp_path / "q.json"), "--home", site.publisher),
    ]
    code, _, err = invoke(capsys, *publish)
    assert code == 1
    assert "could not recover the nonce from the credential" in err
    assert not list((site.repo / "public" / "targets").rglob("*.insb"))
    with Workspace.open(site.publisher).ledger() as ledger:
        (check,) = [e.payload for e in ledger.entries(event_type="attestation.checked")]
    assert check["decision"] == "refused"
