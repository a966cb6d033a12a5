"""Attested admission of sites: a deployed server admits a site only after a fresh TPM quote.

With ``insitu federate server --attest ALLOWLIST``, the Fleet gateway
(:mod:`insitu.federated._gateway`) forwards a SuperNode's Fleet requests only once the
site behind its key has attested; until then it answers 403 and the request never
reaches the SuperLink. The exchange, on the port sites already dial (TLS, the server's
certificate checked against ``ca.pem``):

0. ``GET /insitu/v1/attest/challenge``: every server answers whether it requires
   attestation (``{"attestation": "required", "pcrs": [...]}`` or ``"off"``; with
   ``--ek-ca``, also ``"ek": "required"``). A site asks it at join; one without
   ``INSITU_TPM_TCTI`` is told in one line
   (:class:`~insitu.errors.AttestationRequiredError`) before it writes anything or
   starts a SuperNode, instead of the SuperNode's 403 from Flower;
1. ``POST /insitu/v1/attest/challenge`` ``{"site_key", "time", "proof"}``: ``proof`` is
   the site's signature, with its Flower key, over ``time`` (Unix seconds, within
   :data:`CLOCK_SKEW` of the server's clock, each signature taken once). The server
   finds the registered site of that key and answers a fresh nonce and the PCRs to
   quote (:meth:`insitu.attestation.Verifier.challenge`). With ``--ek-ca`` the request
   also carries ``ek_certificate`` and ``ak_public`` (base64: the TPM's EK certificate
   and the AK's TPM2B_PUBLIC); the certificate must chain to the pinned CA and the AK be
   the enrolled one, and the nonce is answered only as ``credential``, made to that EK
   and AK name, which the site's TPM alone recovers (``tpm2_activatecredential``).
   Without ``--ek-ca`` the AK is trusted on first use (its enrollment). A request that
   is not signed by a registered site's key is answered 403 and holds nothing at the
   server, so a flood of them cannot take a real site's nonce away; a site holds at most
   :data:`~insitu.attestation.MAX_NONCES_PER_SUBJECT` nonces, the server
   :data:`~insitu.attestation.MAX_NONCES`, and one more is answered 429
   (:class:`~insitu.errors.NonceLimitError`);
2. the site (recovering the nonce from the credential, when it is one) extends the
   digest of its insitu build into its TPM's PCR (23 by default) and quotes it over the
   nonce (:class:`insitu.attestation.Tpm`; ``INSITU_TPM_TCTI``);
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
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
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
    quoted_nonce,
)
from insitu.errors import (
    AttestationRefusedError,
    AttestationRequiredError,
    CertificateError,
    EkCertificateError,
    FederationError,
    MeasurementMismatchError,
    NonceLimitError,
    QuoteSignatureError,
    StaleQuoteError,
    TpmError,
    UnknownAttestationKeyError,
)
from insitu.workspace import Workspace

__all__ = [
    "CHALLENGE_PATH",
    "CLOCK_SKEW",
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
_CHALLENGE_CONTEXT = b"insitu-attest-challenge-v1\x00"
#: Seconds a signed challenge request's time may differ from the server's clock.
CLOCK_SKEW = 300.0
_REFUSALS: dict[str, type[AttestationRefusedError]] = {
    cls.__name__: cls
    for cls in (
        MeasurementMismatchError,
        QuoteSignatureError,
        StaleQuoteError,
        UnknownAttestationKeyError,
        EkCertificateError,
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
        ek_cas: list[x509.Certificate] | None = None,
    ) -> None:
        self._verifier = Verifier(ws, allow_list, attestation_keys, kind="site", ek_cas=ek_cas)
        self._by_spki = {
            _spki(serialization.load_ssh_public_key(key)): name for name, key in site_keys.items()
        }
        self._admitted: set[bytes] = set()
        self._seen: dict[bytes, float] = {}  # signed challenge requests, until too old
        self._run = run
        self._lock = threading.Lock()

    @property
    def binds_ek(self) -> bool:
        """Whether a site's AK must be bound to its TPM's certified EK (``--ek-ca``)."""
        return self._verifier.binds_ek

    @property
    def pcrs(self) -> list[int]:
        """The PCRs a site quotes (every PCR the allow-list fixes)."""
        return self._verifier.allow_list.pcrs

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
        """Answer a challenge request: (HTTP status, JSON body).

        Nothing is held for a request that is not signed by a registered site's key
        over a time near this server's clock, nor for one seen before.
        """
        found = self._site_of(body.get("site_key") if isinstance(body, dict) else None)
        if found is None:
            return 403, {"error": "not the key of a site registered at this server"}
        name, spki = found
        refused = self._challenge_refused(name, spki, body)
        if refused is not None:
            return 403, {"error": refused}
        try:
            challenge = self._verifier.challenge(
                name,
                ek_certificate=_b64(body.get("ek_certificate")),
                ak_public=_b64(body.get("ak_public")),
                run=self._run,
            )
        except NonceLimitError as exc:
            logger.warning("attestation: %s", exc)
            return 429, {"error": str(exc), "refusal": NonceLimitError.__name__}
        except AttestationRefusedError as exc:  # the EK binding: recorded by the verifier
            logger.warning("attestation refused: %s", exc)
            return 403, {"error": str(exc), "refusal": type(exc).__name__}
        if challenge.credential is not None:
            credential = base64.b64encode(challenge.credential).decode()
            return 200, {"site": name, "credential": credential, "pcrs": challenge.pcrs}
        return 200, {"site": name, "nonce": challenge.nonce.hex(), "pcrs": challenge.pcrs}

    def _challenge_refused(self, name: str, spki: bytes, body: dict[str, Any]) -> str | None:
        """Why a challenge request is not the site's own, fresh and new (None: it is)."""
        try:
            stamp = int(body["time"])
            proof = base64.b64decode(str(body["proof"]), validate=True)
        except (KeyError, ValueError, TypeError):
            return f"site {name}: a challenge request carries site_key, time and proof"
        key = serialization.load_der_public_key(spki)
        try:
            if not isinstance(key, ec.EllipticCurvePublicKey):  # registered keys are EC
                raise InvalidSignature
            key.verify(proof, _challenge_message(stamp), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return f"site {name}: the challenge request is not signed by its registered key"
        if abs(time.time() - stamp) > CLOCK_SKEW:
            return (
                f"site {name}: the challenge request's time is more than {CLOCK_SKEW:.0f} s "
                "from the server's clock; set the site's clock (NTP) and join again"
            )
        seen = hashlib.sha256(proof).digest()
        now = time.monotonic()
        with self._lock:
            self._seen = {k: until for k, until in self._seen.items() if until >= now}
            if seen in self._seen:
                return f"site {name}: this challenge request was sent before (a replay)"
            self._seen[seen] = now + 2 * CLOCK_SKEW
        return None

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
        nonce = quoted_nonce(quote.attest)
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


def _b64(value: object) -> bytes | None:
    """Base64 text decoded (None when absent or not base64: the verifier says why)."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


def _challenge_message(stamp: int) -> bytes:
    return _CHALLENGE_CONTEXT + str(stamp).encode("ascii")


def attest_to_server(server: str, ca: Path, key: Path, *, context: Any) -> bool:
    """Attest this site to the server at ``server``, when the server requires it.

    A server that does not ask for attestation (``off``, or an older server's 404) is
    told nothing (False). Returns True once admitted.

    Raises:
        AttestationRequiredError: the server requires attestation and this machine has
            no TPM configured (``INSITU_TPM_TCTI``): the one line names the fix.
        AttestationRefusedError: the server refused the quote (its one line, e.g. naming
            the PCR whose value no allowed state has).
        NonceLimitError: the server holds as many nonces for this site as it allows.
        TpmError: the TPM or tpm2-tools cannot be used.
        FederationError: the server answered something else.

    """
    import httpx

    tcti = os.environ.get(TCTI_ENV)
    private = serialization.load_ssh_private_key(key.read_bytes(), None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key} is not an EC key; Flower authenticates sites with EC keys")
    try:
        with httpx.Client(base_url=f"https://{server}", verify=context, timeout=30.0) as http:
            asked = http.get(CHALLENGE_PATH)
            if not tcti:
                _require_no_attestation(server, asked)
                return False
            return _attest(server, http, Tpm(tcti), private, ek=_asks_ek(asked))
    except httpx.HTTPError as exc:
        raise FederationError(
            f"the server at {server} did not complete the attestation exchange ({exc}); "
            "check that it is up and join again"
        ) from exc


def _require_no_attestation(server: str, answer: Any) -> None:
    """Raise the one line for a site without a TPM when the server requires a quote."""
    try:
        document = answer.json()
    except ValueError:
        document = None
    if (
        answer.status_code == 200
        and isinstance(document, dict)
        and document.get("attestation") == "required"
    ):
        pcrs = ",".join(str(p) for p in document.get("pcrs") or [DEFAULT_PCR])
        raise AttestationRequiredError(
            f"the server at {server} requires TPM attestation (it runs 'federate server "
            f"--attest', PCR {pcrs}) and this site has no TPM configured: set {TCTI_ENV} to "
            "this site's TPM (e.g. device:/dev/tpmrm0), have its AK ('insitu attest key') "
            "enrolled at the server, and join again"
        )
    logger.info("the server at %s does not ask for attestation", server)


def _asks_ek(answer: Any) -> bool:
    """Whether the server binds AKs to certified EKs (its ``GET`` answer says so)."""
    try:
        document = answer.json()
    except ValueError:
        return False
    return (
        answer.status_code == 200
        and isinstance(document, dict)
        and document.get("ek") == "required"
    )


def _attest(
    server: str, http: Any, tpm: Tpm, private: ec.EllipticCurvePrivateKey, *, ek: bool
) -> bool:
    site_key = (
        private.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    pcr = int(os.environ.get(PCR_ENV, str(DEFAULT_PCR)))
    stamp = int(time.time())
    signed = private.sign(_challenge_message(stamp), ec.ECDSA(hashes.SHA256()))
    request = {"site_key": site_key, "time": stamp, "proof": base64.b64encode(signed).decode()}
    if ek:  # the server checks them, then sends the nonce only inside a credential
        request["ek_certificate"] = base64.b64encode(_ek_certificate(server, tpm)).decode()
        request["ak_public"] = base64.b64encode(tpm.ak_public_area()).decode()
    answer = http.post(CHALLENGE_PATH, json=request)
    if answer.status_code == 404:
        logger.info("the server at %s does not ask for attestation", server)
        return False
    document = _answer(server, answer)
    if "credential" in document:
        nonce = tpm.activate(base64.b64decode(str(document["credential"]), validate=True))
    else:
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


def _ek_certificate(server: str, tpm: Tpm) -> bytes:
    try:
        return tpm.ek_certificate()
    except TpmError as exc:
        raise TpmError(
            f"the server at {server} binds attestation keys to the TPM's EK certificate "
            f"(--ek-ca) and this TPM's cannot be read ({exc}); use a TPM with an EK "
            "certificate, or ask the operator"
        ) from exc


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
    if answer.status_code == 429:
        raise NonceLimitError(f"the server at {server} holds too many nonces: {message}")
    raise FederationError(
        f"the server at {server} answered the attestation with HTTP {answer.status_code} "
        f"({message or 'no reason'}); run the same insitu version on the server and sites"
    )
