"""The verifier's side: a fresh nonce, a quote checked against an enrolled AK and an allow-list.

A check runs in this order, and the first failure decides:

1. the subject (a site or a device) has an enrolled attestation key (AK);
2. the quote's signature verifies against that AK: ECDSA or RSASSA over SHA-256 of the
   TPM's ``TPMS_ATTEST`` structure, checked with ``cryptography`` (so a verifier needs no
   TPM and no tpm2-tools; ``tpm2_checkquote`` checks the same three things and agrees);
3. the signed structure is a quote (``TPM_GENERATED_VALUE``, ``TPM_ST_ATTEST_QUOTE``) and
   its qualifying data is a nonce this verifier issued to this subject, once, less than
   :data:`NONCE_TTL` seconds ago: a replayed quote, or one over another verifier's nonce,
   is refused (the nonces outstanding are bounded per subject and in all, and one more
   is refused rather than made room for: see :class:`Verifier`);
4. the quoted selection is the SHA-256 bank of exactly the PCRs the allow-list names,
   and the PCR values sent hash to the signed digest;
5. some measured state of the allow-list has every one of those PCR values.

Every decision, admitted or refused, is recorded as ``attestation.checked`` in the
verifier's ledger (subject, kind, PCRs, the AK's fingerprint and, for a refusal, the
reason and the PCR that differed), before it is returned.

With ``ek_cas`` (the operator's pinned TPM vendor CAs), the AK is no longer trusted on
enrollment alone: the challenge request carries the TPM's EK certificate and the AK's
public area, the certificate must chain to a pinned CA and the AK be the enrolled one,
fit to attest (:mod:`insitu.attestation._ek`), and the nonce is sent only inside a
credential made to that EK and AK name (TPM2_MakeCredential). Only the TPM holding both
recovers it, so a quote over it proves the AK is resident with the certified EK. A
refusal at the challenge is recorded too (with the EK certificate's fingerprint).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import struct
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from insitu._atomic import atomic_write_text
from insitu.attestation._ek import (
    ak_public_key,
    check_ek_certificate,
    ek_fingerprint,
    make_credential,
)
from insitu.attestation._quote import Quote
from insitu.audit import events
from insitu.errors import (
    AllowListError,
    AttestationRefusedError,
    EkCertificateError,
    MeasurementMismatchError,
    NonceLimitError,
    QuoteSignatureError,
    StaleQuoteError,
    UnknownAttestationKeyError,
)
from insitu.workspace import Workspace

__all__ = [
    "MAX_NONCES",
    "MAX_NONCES_PER_SUBJECT",
    "NONCE_TTL",
    "AllowList",
    "Challenge",
    "Decision",
    "MeasuredState",
    "Verifier",
    "ak_fingerprint",
    "quoted_nonce",
]

logger = logging.getLogger(__name__)

#: Seconds a nonce stays valid after it was issued.
NONCE_TTL = 120.0
#: Nonces outstanding at once for one subject (a retry must not evict the first).
MAX_NONCES_PER_SUBJECT = 4
#: Nonces outstanding at once in all, whatever the subjects.
MAX_NONCES = 1024
_NONCE_BYTES = 32
_now = time.monotonic  # the clock of in-memory nonces (a test moves it)
_TPM_GENERATED = 0xFF544347
_ST_ATTEST_QUOTE = 0x8018
_ALG_SHA256 = 0x000B
_ALG_ECDSA = 0x0018
_ALG_RSASSA = 0x0014


def ak_fingerprint(pem: bytes) -> str:
    """``sha256:<hex>`` of an AK's SubjectPublicKeyInfo (DER)."""
    key = serialization.load_pem_public_key(pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _fingerprint_or_none(pem: bytes) -> str | None:
    try:
        return ak_fingerprint(pem)
    except (ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- allow-list


@dataclass(frozen=True)
class MeasuredState:
    """One allowed state: a name and the SHA-256 value of each PCR it fixes (hex)."""

    name: str
    pcrs: dict[int, str]


@dataclass(frozen=True)
class AllowList:
    """The measured states a verifier admits: a TOML file of ``[[state]]`` tables.

    For example::

        [[state]]
        name = "insitu 0.9.0"
        pcrs = { 23 = "<SHA-256 PCR value, hex>" }
    """

    states: tuple[MeasuredState, ...]
    source: str = "allow-list"

    @property
    def pcrs(self) -> list[int]:
        """Every PCR some state fixes: what a quote must cover."""
        return sorted({pcr for state in self.states for pcr in state.pcrs})

    @classmethod
    def load(cls, path: Path) -> AllowList:
        """Read an allow-list file.

        Raises:
            AllowListError: unreadable, not TOML, no state, or a malformed state.

        """
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise AllowListError(
                f"cannot read the allow-list {path}: {exc}; write one with 'insitu attest allow'"
            ) from exc
        raw = data.get("state")
        if not isinstance(raw, list) or not raw:
            raise AllowListError(
                f"the allow-list {path} has no [[state]]; write one with 'insitu attest allow'"
            )
        return cls(tuple(_state(path, item) for item in raw), source=str(path))

    def to_toml(self) -> str:
        """The TOML text of this allow-list."""
        lines: list[str] = []
        for state in self.states:
            pcrs = ", ".join(f'{pcr} = "{value}"' for pcr, value in sorted(state.pcrs.items()))
            lines += ["[[state]]", f"name = {_toml_str(state.name)}", f"pcrs = {{ {pcrs} }}", ""]
        return "\n".join(lines)


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _state(path: Path, item: object) -> MeasuredState:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise AllowListError(f"the allow-list {path}: every [[state]] needs a name")
    pcrs = item.get("pcrs")
    if not isinstance(pcrs, dict) or not pcrs:
        raise AllowListError(f"the allow-list {path}: state {item['name']!r} fixes no PCR")
    values: dict[int, str] = {}
    for key, value in pcrs.items():
        try:
            index = int(key)
            digest = bytes.fromhex(str(value))
        except ValueError as exc:
            raise AllowListError(
                f"the allow-list {path}: state {item['name']!r}: PCR {key!r} = {value!r} is "
                "not a PCR number and a SHA-256 value in hex"
            ) from exc
        if not 0 <= index <= 23 or len(digest) != 32:
            raise AllowListError(
                f"the allow-list {path}: state {item['name']!r}: PCR {key} must be 0-23 with "
                "a 32-byte SHA-256 value"
            )
        values[index] = digest.hex()
    return MeasuredState(item["name"], values)


# --------------------------------------------------------------------------- TPM structures


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("truncated TPM structure")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def sized(self) -> bytes:
        return self.take(self.u16())


@dataclass(frozen=True)
class _Attest:
    magic: int
    kind: int
    extra_data: bytes
    selection: dict[int, list[int]]  # hash algorithm -> PCR indices
    pcr_digest: bytes


def _parse_attest(data: bytes) -> _Attest:
    r = _Reader(data)
    magic, kind = r.u32(), r.u16()
    r.sized()  # qualifiedSigner
    extra = r.sized()
    r.take(17 + 8)  # clockInfo, firmwareVersion
    selection: dict[int, list[int]] = {}
    for _ in range(r.u32()):
        alg, bitmap = r.u16(), r.take(r.u8())
        selection[alg] = [
            8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1
        ]
    return _Attest(magic, kind, extra, selection, r.sized())


def quoted_nonce(attest: bytes) -> bytes:
    """The qualifying data (the nonce) of a TPMS_ATTEST, unverified (b"" if unreadable)."""
    try:
        return _parse_attest(attest).extra_data
    except ValueError:
        return b""


def _verify_signature(pem: bytes, attest: bytes, signature: bytes) -> None:
    """Raise ``InvalidSignature`` (or ``ValueError``) unless ``signature`` is the AK's."""
    key = serialization.load_pem_public_key(pem)
    r = _Reader(signature)
    alg, hash_alg = r.u16(), r.u16()
    if hash_alg != _ALG_SHA256:
        raise ValueError("the quote is not signed over SHA-256")
    if alg == _ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
        der = encode_dss_signature(int.from_bytes(r.sized()), int.from_bytes(r.sized()))
        key.verify(der, attest, ec.ECDSA(hashes.SHA256()))
    elif alg == _ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
        key.verify(r.sized(), attest, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise ValueError(f"signature algorithm {alg:#06x} does not fit the enrolled key")


# --------------------------------------------------------------------------- the verifier


@dataclass(frozen=True)
class Challenge:
    """What a verifier sends the prover: a fresh nonce and the PCRs to quote.

    With the EK bound, the prover is sent ``credential`` (tpm2-tools' credential file,
    the nonce inside), never ``nonce`` in clear; ``ek_fingerprint`` names the EK.
    """

    nonce: bytes
    pcrs: list[int]
    credential: bytes | None = None
    ek_fingerprint: str | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome of one check, as recorded in the verifier's ledger."""

    subject: str
    kind: str
    admitted: bool
    pcrs: list[int]
    reason: str | None = None
    pcr: int | None = None
    measurement: str | None = None
    ak_fingerprint: str | None = None
    ek_fingerprint: str | None = None
    error: AttestationRefusedError | None = field(default=None, compare=False, repr=False)

    def raise_if_refused(self) -> None:
        """Raise the refusal (a subclass of AttestationRefusedError), if it is one."""
        if self.error is not None:
            raise self.error


class Verifier:
    """Issues nonces and checks quotes for one kind of subject; see the module docstring.

    ``keys`` maps each subject to its enrolled AK public key (PEM). Thread-safe: a
    server's gateway checks sites from its own thread. Nonces live in memory, bounded:
    at most ``max_per_subject`` outstanding for one subject and ``max_nonces`` in all,
    each dropped once used or :data:`NONCE_TTL` seconds after it was issued; one more is
    refused (:class:`~insitu.errors.NonceLimitError`), never made room for by evicting
    one, so asking for nonces cannot take away the one a real prover is quoting. With
    ``persistent``, a nonce lives in ``<home>/attestation/nonces/`` (0600, one file per
    subject, taken by an atomic rename), so that the challenge and the check may be two
    commands: a device quotes out of band (``insitu attest challenge``, then ``verify``).
    With ``ek_cas``, every challenge binds the AK to a certified EK (module docstring).
    """

    def __init__(
        self,
        ws: Workspace,
        allow_list: AllowList,
        keys: Mapping[str, bytes],
        *,
        kind: str = "site",
        nonce_ttl: float = NONCE_TTL,
        persistent: bool = False,
        max_per_subject: int = MAX_NONCES_PER_SUBJECT,
        max_nonces: int = MAX_NONCES,
        ek_cas: Sequence[x509.Certificate] | None = None,
    ) -> None:
        if kind not in ("site", "device"):
            raise ValueError(f"kind {kind!r}: site or device")
        self._ws, self.allow_list, self._keys = ws, allow_list, dict(keys)
        self.kind, self._ttl = kind, nonce_ttl
        self._nonces: dict[str, list[tuple[bytes, float, str | None]]] = {}
        self._ek_cas = list(ek_cas) if ek_cas is not None else None
        self._max_per_subject, self._max_nonces = max_per_subject, max_nonces
        self._lock = threading.Lock()
        self._dir = ws.home / "attestation" / "nonces" if persistent else None

    @property
    def binds_ek(self) -> bool:
        """Whether this verifier binds AKs to certified EKs (it was given ``ek_cas``)."""
        return self._ek_cas is not None

    def challenge(
        self,
        subject: str,
        *,
        ek_certificate: bytes | None = None,
        ak_public: bytes | None = None,
        run: str | None = None,
    ) -> Challenge:
        """A fresh nonce for ``subject`` and the PCRs to quote.

        In memory it is added to the subject's outstanding nonces; with ``persistent``
        it replaces the subject's earlier one. With ``ek_cas``, ``ek_certificate`` (DER
        or PEM) and ``ak_public`` (the AK's TPM2B_PUBLIC) are checked first and the
        nonce goes out only inside the challenge's ``credential``.

        Raises:
            EkCertificateError: the EK certificate does not chain to a pinned CA, or the
                AK sent is unfit or not the enrolled one (recorded in the ledger).
            UnknownAttestationKeyError: no AK is enrolled for ``subject`` (recorded).
            NonceLimitError: the subject, or the verifier in all, has as many nonces
                outstanding as allowed (the caller answers HTTP 429).

        """
        nonce = secrets.token_bytes(_NONCE_BYTES)
        credential = fingerprint = None
        if self._ek_cas is not None:
            ek, fingerprint = self._bind(subject, ek_certificate, ak_public, run=run)
            credential = make_credential(ek, ak_public or b"", nonce)
        made = Challenge(nonce, self.allow_list.pcrs, credential, fingerprint)
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            record = {"nonce": nonce.hex(), "expires": time.time() + self._ttl, "ek": fingerprint}
            atomic_write_text(self._nonce_file(subject), json.dumps(record), mode=0o600)
            return made
        now = _now()
        with self._lock:
            self._expire(now)
            mine = self._nonces.setdefault(subject, [])
            if len(mine) >= self._max_per_subject:
                raise NonceLimitError(
                    f"{self.kind} {subject} has {len(mine)} nonces outstanding, the most this "
                    f"verifier allows; quote one of them, or ask again within {self._ttl:.0f} s"
                )
            if self.outstanding >= self._max_nonces:
                raise NonceLimitError(
                    f"this verifier has {self._max_nonces} nonces outstanding, the most it "
                    f"allows; ask again within {self._ttl:.0f} s"
                )
            mine.append((nonce, now + self._ttl, fingerprint))
        return made

    def _bind(
        self, subject: str, certificate: bytes | None, area: bytes | None, *, run: str | None
    ) -> tuple[rsa.RSAPublicKey, str]:
        """The certified EK of ``subject``'s TPM and its certificate's fingerprint."""
        who = f"{self.kind} {subject}"
        fingerprint: str | None = None
        error: AttestationRefusedError
        try:
            if not certificate or not area:
                raise EkCertificateError(
                    "no EK certificate and AK public area were sent, and this verifier binds "
                    "the AK to a certified EK; run insitu 0.10 or later on a TPM with an EK "
                    "certificate"
                )
            fingerprint = ek_fingerprint(certificate)
            ek = check_ek_certificate(certificate, self._ek_cas or [])
            sent = ak_fingerprint(ak_public_key(area))
            enrolled = self._keys.get(subject)
            if enrolled is None:
                error = UnknownAttestationKeyError(
                    f"{who} refused: no attestation key is enrolled for it; enroll the AK "
                    "public key it printed with 'insitu attest key'"
                )
            elif sent != _fingerprint_or_none(enrolled):
                error = EkCertificateError(
                    f"{who} refused: the AK sent with its EK certificate ({sent[:23]}) is not "
                    "its enrolled attestation key; enroll the AK of the TPM this EK "
                    "certificate belongs to"
                )
            else:
                return ek, fingerprint
        except EkCertificateError as exc:
            error = EkCertificateError(f"{who} refused: {exc}")
        self._record(self._refuse(subject, error, ek_fingerprint=fingerprint), run)
        raise error

    @property
    def outstanding(self) -> int:
        """How many nonces are held in memory (expired ones go at the next challenge)."""
        return sum(len(held) for held in self._nonces.values())

    def _expire(self, now: float) -> None:
        for subject in list(self._nonces):
            kept = [held for held in self._nonces[subject] if held[1] >= now]
            if kept:
                self._nonces[subject] = kept
            else:
                del self._nonces[subject]

    def _nonce_file(self, subject: str) -> Path:
        folder = self._dir if self._dir is not None else self._ws.home / "attestation"
        name = hashlib.sha256(f"{self.kind}\0{subject}".encode()).hexdigest()[:32]
        return folder / f"{name}.json"

    def _take_nonce(self, subject: str, quoted: bytes) -> tuple[bytes | None, str | None]:
        """The subject's outstanding nonce the quote names, used up, and its EK's fingerprint.

        The nonce is None when there is no fresh one.
        """
        if self._dir is not None:
            return self._take_file_nonce(subject)
        with self._lock:
            held = self._nonces.get(subject, [])
            for at, (nonce, expiry, ek) in enumerate(held):
                if hmac.compare_digest(nonce, quoted):
                    del held[at]
                    if not held:
                        del self._nonces[subject]
                    return (nonce if _now() <= expiry else None), ek
        return None, None

    def _take_file_nonce(self, subject: str) -> tuple[bytes | None, str | None]:
        path = self._nonce_file(subject)
        taken = path.with_name(f"{path.stem}.{secrets.token_hex(8)}.taken")
        try:
            path.replace(taken)  # one check only, even when two race for it
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(taken.read_text(encoding="utf-8"))
            nonce, expires = bytes.fromhex(record["nonce"]), float(record["expires"])
            ek = record.get("ek")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, None
        finally:
            taken.unlink(missing_ok=True)
        return (nonce if time.time() <= expires else None), (ek if isinstance(ek, str) else None)

    def check(self, subject: str, quote: Quote, *, run: str | None = None) -> Decision:
        """Check ``quote`` from ``subject`` against its nonce, AK and the allow-list.

        The nonce the quote names is used up whatever the outcome. The decision is
        recorded in the verifier's ledger and returned; :meth:`Decision.raise_if_refused`
        raises it.
        """
        nonce, ek = self._take_nonce(subject, quoted_nonce(quote.attest))
        decision = replace(self._decide(subject, quote, nonce), ek_fingerprint=ek)
        self._record(decision, run)
        # The caller reports a refusal (the CLI's one line, the server's warning).
        logger.info("attestation of %s %s: %s", self.kind, subject, decision.reason)
        return decision

    def _record(self, decision: Decision, run: str | None) -> None:
        """Record ``decision`` as ``attestation.checked`` in the verifier's ledger."""
        payload = {
            "subject": decision.subject,
            "kind": self.kind,
            "decision": "admitted" if decision.admitted else "refused",
            "pcrs": decision.pcrs,
        }
        optional = {
            "reason": decision.reason,
            "pcr": decision.pcr,
            "measurement": decision.measurement,
            "ak_fingerprint": decision.ak_fingerprint,
            "ek_fingerprint": decision.ek_fingerprint,
            "run": run,
        }
        with self._ws.ledger() as ledger:
            events.ATTESTATION_CHECKED.record(
                ledger, **payload, **{k: v for k, v in optional.items() if v is not None}
            )

    def _refuse(self, subject: str, error: AttestationRefusedError, **kw: object) -> Decision:
        return Decision(
            subject,
            self.kind,
            admitted=False,
            pcrs=self.allow_list.pcrs,
            reason=str(error),
            error=error,
            **kw,  # type: ignore[arg-type]
        )

    def _decide(self, subject: str, quote: Quote, nonce: bytes | None) -> Decision:
        who = f"{self.kind} {subject}"
        pem = self._keys.get(subject)
        if pem is None:
            return self._refuse(
                subject,
                UnknownAttestationKeyError(
                    f"{who} refused: no attestation key is enrolled for it; enroll the AK "
                    "public key it printed with 'insitu attest key'"
                ),
            )
        try:
            fingerprint = ak_fingerprint(pem)
        except (ValueError, TypeError):
            return self._refuse(
                subject,
                UnknownAttestationKeyError(
                    f"{who} refused: its enrolled attestation key is not a PEM public key; "
                    "enroll the file 'insitu attest key --out' wrote"
                ),
            )
        try:
            _verify_signature(pem, quote.attest, quote.signature)
            attest = _parse_attest(quote.attest)
        except (InvalidSignature, ValueError):
            return self._refuse(
                subject,
                QuoteSignatureError(
                    f"{who} refused: the quote's signature does not verify against its "
                    f"enrolled attestation key {fingerprint[:23]} (another TPM's quote, or "
                    "an altered one)"
                ),
                ak_fingerprint=fingerprint,
            )
        if (
            attest.magic != _TPM_GENERATED
            or attest.kind != _ST_ATTEST_QUOTE
            or nonce is None
            or not hmac.compare_digest(attest.extra_data, nonce)
        ):
            bound = (
                ", or one by an AK that could not recover the nonce from the credential "
                "made to its certified EK"
                if self._ek_cas is not None
                else ""
            )
            return self._refuse(
                subject,
                StaleQuoteError(
                    f"{who} refused: the quote is not over this verifier's fresh nonce (a "
                    f"replayed or expired quote{bound}); ask for a new nonce and quote again"
                ),
                ak_fingerprint=fingerprint,
            )
        return self._match(subject, quote, attest, fingerprint)

    def _match(self, subject: str, quote: Quote, attest: _Attest, fingerprint: str) -> Decision:
        who = f"{self.kind} {subject}"
        wanted = self.allow_list.pcrs
        values = b"".join(quote.pcr_values.get(pcr, b"") for pcr in wanted)
        if (
            attest.selection != {_ALG_SHA256: wanted}
            or sorted(quote.pcr_values) != wanted
            or hashlib.sha256(values).digest() != attest.pcr_digest
        ):
            return self._refuse(
                subject,
                QuoteSignatureError(
                    f"{who} refused: the quote does not cover SHA-256 PCRs "
                    f"{','.join(map(str, wanted))} with the values sent; quote them as asked"
                ),
                ak_fingerprint=fingerprint,
            )
        measured = {pcr: quote.pcr_values[pcr].hex() for pcr in wanted}
        for state in self.allow_list.states:
            if all(measured[pcr] == value for pcr, value in state.pcrs.items()):
                return Decision(
                    subject,
                    self.kind,
                    admitted=True,
                    pcrs=wanted,
                    ak_fingerprint=fingerprint,
                    reason=f"measured state {state.name!r}",
                )
        return self._mismatch(subject, measured, fingerprint)

    def _mismatch(self, subject: str, measured: dict[int, str], fingerprint: str) -> Decision:
        nearest = min(
            self.allow_list.states,
            key=lambda s: sum(measured[p] != v for p, v in s.pcrs.items()),
        )
        pcr = min(p for p, v in nearest.pcrs.items() if measured[p] != v)
        error = MeasurementMismatchError(
            f"{self.kind} {subject} refused: PCR {pcr} is {measured[pcr][:16]}..., which no "
            f"allowed state has (nearest: {nearest.name!r} expects {nearest.pcrs[pcr][:16]}...; "
            f"{self.allow_list.source}); run an allowed build, or add this one to the allow-list",
            pcr=pcr,
        )
        return self._refuse(
            subject, error, pcr=pcr, measurement=measured[pcr], ak_fingerprint=fingerprint
        )
