"""Attested admission of sites: a deployed server admits a site only after a fresh TPM quote.

With ``insitu federate server --attest ALLOWLIST``, the Fleet gateway
(:mod:`insitu.federated._gateway`) forwards a SuperNode's Fleet requests only once the
site behind its key has attested; until then it answers 403 and the request never
reaches the SuperLink. The exchange, on the port sites already dial (TLS, the server's
certificate checked against ``ca.pem``):

1. ``POST /insitu/v1/attest/challenge`` ``{"site_key": <OpenSSH public key>}``: the
   server finds the registered site of that key and answers a fresh nonce and the PCRs
   to quote (:meth:`insitu.attestation.Verifier.challenge`);
2. the site extends the digest of its insitu build into its TPM's PCR (23 by default)
   and quotes it over the nonce (:class:`insitu.attestation.Tpm`; ``INSITU_TPM_TCTI``);
3. ``POST /insitu/v1/attest/quote`` ``{"site_key", "quote", "proof"}``: ``proof`` is the
   site's signature, with its Flower key, over the nonce, so the holder of the site key
   and the holder of the TPM answer the same challenge. The server checks it, then the
   quote against the site's enrolled attestation key (``<certs>/sites/NAME.ak.pem``) and
   the allow-list, records ``attestation.checked`` in its ledger, and answers 200 (the
   site's key is admitted for this server's life) or 403 with the refusal's one line.

Admission is checked once, at join: a site that changes its build afterwards is not seen
until it joins again (docs/attestation.md, "Limits").
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.attestation import (
    DEFAULT_PCR,
    TCTI_ENV,
    AllowList,
    Quote,
    Tpm,
    Verifier,
    build_digest,
)
from insitu.errors import (
    AttestationRefusedError,
    CertificateError,
    FederationError,
    MeasurementMismatchError,
    QuoteSignatureError,
    StaleQuoteError,
    UnknownAttestationKeyError,
)
from insitu.workspace import Workspace

__all__ = [
    "CHALLENGE_PATH",
    "PCR_ENV",
    "QUOTE_PATH",
    "SiteAdmission",
    "attest_to_server",
    "site_attestation_keys",
]

logger = logging.getLogger(__name__)

CHALLENGE_PATH = "/insitu/v1/attest/challenge"
QUOTE_PATH = "/insitu/v1/attest/quote"
#: The environment variable choosing the PCR a site measures its build into (default 23).
PCR_ENV = "INSITU_TPM_PCR"
_PROOF_CONTEXT = b"insitu-attest-v1\x00"
_REFUSALS: dict[str, type[AttestationRefusedError]] = {
    cls.__name__: cls
    for cls in (
        MeasurementMismatchError,
        QuoteSignatureError,
        StaleQuoteError,
        UnknownAttestationKeyError,
    )
}


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def site_attestation_keys(sites_dir: Path, names: list[str]) -> dict[str, bytes]:
    """The enrolled AK (PEM) of each site that has ``<sites_dir>/<name>.ak.pem``."""
    keys = {}
    for name in names:
        path = sites_dir / f"{name}.ak.pem"
        if path.is_file():
            keys[name] = path.read_bytes()
        else:
            logger.warning(
                "site %s has no enrolled attestation key (%s): it will be refused", name, path
            )
    return keys


class SiteAdmission:
    """Which registered site keys have attested; the gateway asks it (thread-safe)."""

    def __init__(
        self,
        ws: Workspace,
        allow_list: AllowList,
        site_keys: dict[str, bytes],
        attestation_keys: dict[str, bytes],
        *,
        run: str | None = None,
    ) -> None:
        self._verifier = Verifier(ws, allow_list, attestation_keys, kind="site")
        self._by_spki = {
            _spki(serialization.load_ssh_public_key(key)): name for name, key in site_keys.items()
        }
        self._admitted: set[bytes] = set()
        self._run = run
        self._lock = threading.Lock()

    def _site_of(self, openssh: object) -> tuple[str, bytes] | None:
        try:
            spki = _spki(serialization.load_ssh_public_key(str(openssh).encode()))
        except (ValueError, TypeError, UnicodeError):
            return None
        name = self._by_spki.get(spki)
        return None if name is None else (name, spki)

    def admits(self, header: str | None) -> bool:
        """Whether a Fleet request with this ``flwr-public-key`` header (base64 PEM) may pass."""
        if not header:
            return False
        try:
            spki = _spki(serialization.load_pem_public_key(base64.b64decode(header)))
        except (ValueError, TypeError):
            return False
        with self._lock:
            return spki in self._admitted

    def challenge(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Answer a challenge request: (HTTP status, JSON body)."""
        found = self._site_of(body.get("site_key") if isinstance(body, dict) else None)
        if found is None:
            return 403, {"error": "not the key of a site registered at this server"}
        challenge = self._verifier.challenge(found[0])
        return 200, {"site": found[0], "nonce": challenge.nonce.hex(), "pcrs": challenge.pcrs}

    def check(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Answer a quote: check the proof, then the quote; (HTTP status, JSON body)."""
        found = self._site_of(body.get("site_key") if isinstance(body, dict) else None)
        if found is None:
            return 403, {"error": "not the key of a site registered at this server"}
        name, spki = found
        try:
            quote = Quote.from_json(body.get("quote"))
            proof = base64.b64decode(str(body.get("proof")), validate=True)
        except (ValueError, TypeError, KeyError):
            return 400, {"error": "a quote request carries site_key, quote and proof"}
        nonce = _attest_extra_data(quote.attest)
        key = serialization.load_der_public_key(spki)
        try:
            if not isinstance(key, ec.EllipticCurvePublicKey):  # registered keys are EC
                raise InvalidSignature
            key.verify(proof, _PROOF_CONTEXT + nonce, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return 403, {"error": f"site {name}: the proof is not signed by its registered key"}
        decision = self._verifier.check(name, quote, run=self._run)
        if not decision.admitted:
            logger.warning("attestation refused: %s", decision.reason)
            error = decision.error
            return 403, {
                "error": decision.reason,
                "refusal": type(error).__name__ if error else "AttestationRefusedError",
                "pcr": decision.pcr,
            }
        with self._lock:
            self._admitted.add(spki)
        return 200, {"site": name, "decision": "admitted"}


def _attest_extra_data(attest: bytes) -> bytes:
    """The qualifying data of a TPMS_ATTEST (b"" if it cannot be read)."""
    try:
        signer = int.from_bytes(attest[6:8])
        at = 8 + signer
        size = int.from_bytes(attest[at : at + 2])
        return attest[at + 2 : at + 2 + size]
    except (IndexError, ValueError):
        return b""


def attest_to_server(server: str, ca: Path, key: Path, *, context: Any) -> bool:
    """Attest this site to the server at ``server``, if this machine has a TPM configured.

    Without ``INSITU_TPM_TCTI`` nothing happens (False). A server that does not ask for
    attestation (404) is told nothing either (False). Returns True once admitted.

    Raises:
        AttestationRefusedError: the server refused the quote (its one line, e.g. naming
            the PCR whose value no allowed state has).
        TpmError: the TPM or tpm2-tools cannot be used.
        FederationError: the server answered something else.

    """
    tcti = os.environ.get(TCTI_ENV)
    if not tcti:
        return False
    import httpx

    private = serialization.load_ssh_private_key(key.read_bytes(), None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key} is not an EC key; Flower authenticates sites with EC keys")
    site_key = (
        private.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    tpm = Tpm(tcti)
    pcr = int(os.environ.get(PCR_ENV, str(DEFAULT_PCR)))
    with httpx.Client(base_url=f"https://{server}", verify=context, timeout=30.0) as http:
        answer = http.post(CHALLENGE_PATH, json={"site_key": site_key})
        if answer.status_code == 404:
            logger.info("the server at %s does not ask for attestation", server)
            return False
        document = _answer(server, answer)
        nonce = bytes.fromhex(document["nonce"])
        tpm.measure(build_digest(), pcr=pcr)
        quote = tpm.quote(nonce, document["pcrs"])
        proof = private.sign(_PROOF_CONTEXT + nonce, ec.ECDSA(hashes.SHA256()))
        body = {
            "site_key": site_key,
            "quote": quote.to_json(),
            "proof": base64.b64encode(proof).decode(),
        }
        _answer(server, http.post(QUOTE_PATH, json=body))
    return True


def _answer(server: str, answer: Any) -> dict[str, Any]:
    try:
        document = answer.json()
    except ValueError:
        document = None
    if answer.status_code == 200 and isinstance(document, dict):
        return document
    message = document.get("error") if isinstance(document, dict) else None
    if answer.status_code == 403 and isinstance(document, dict):
        refusal = _REFUSALS.get(str(document.get("refusal")), AttestationRefusedError)
        error = refusal(f"the server at {server} refused this site's attestation: {message}")
        raise error
    raise FederationError(
        f"the server at {server} answered the attestation with HTTP {answer.status_code} "
        f"({message or 'no reason'}); run the same insitu version on the server and sites"
    )
