"""A node's signing key in a PKCS#11 token: generated there, used there, never exported.

``insitu init --key-uri 'pkcs11:token=NAME;object=LABEL'`` asks the token (a hardware
security module, a smart card, SoftHSM2, a TPM through tpm2-pkcs11) to generate the
node's key pair with the private half *sensitive* and *not extractable*; the workspace
keeps only the public key and the URI. Every signature (ledger entries and tree heads,
bundles) is then made by the token: a copy of the workspace on another machine holds no
key to sign with. The key is Ed25519 (``CKM_EDDSA``) when the token has it, else ECDSA
P-256 (``CKM_ECDSA`` over a SHA-256 digest made here; a TPM has no Ed25519), whose
``r || s`` becomes the recorded signature of ``insitu._signer``.

The node's bundle decryption key can live there too (:class:`TokenDecryptionKey`): a
P-256 key agreement key (``CKA_DERIVE`` only), labelled as the signing key plus
``-decrypt``, whose ECDH (``CKM_ECDH1_DERIVE``) with a bundle's ephemeral key runs in the
token; it shares the signing key's session (one login per token and process). A token
without ECDH that decrypts with RSA-OAEP (a TPM through tpm2-pkcs11) gets an RSA key
instead (:class:`TokenRsaDecryptionKey`, ``CKA_DECRYPT`` only): loading a bundle asks it
for ``CKM_RSA_PKCS_OAEP`` (SHA-256, MGF1-SHA-256) over the entry's 32-byte secret.

URIs follow RFC 7512, the subset a key needs: ``token`` (the token's label) and
``object`` (the key's label) in the path, ``module-path`` (the PKCS#11 library) in the
query, percent-encoding allowed. The PIN comes from ``INSITU_PKCS11_PIN`` (or the CLI's
prompt), never from a flag or the URI (``pin-value`` is refused: a PIN on a command
line is in the shell history and in ``ps``).

Written on PyKCS11 (the binding securesystemslib's and model_signing's HSM signers use);
the little here that is insitu's own is the URI subset, the key template and the error
messages: what a token refuses becomes one line naming the fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from insitu._signer import ED25519, P256, SigningPublicKey, algorithm_of, ecdsa_record
from insitu.errors import (
    MissingDependencyError,
    TokenError,
    TokenKeyNotFoundError,
    TokenModuleError,
    UsageError,
    WrongPinError,
)

__all__ = [
    "DECRYPT_SUFFIX",
    "KEY_ALGORITHMS",
    "PIN_ENV",
    "RSA_OAEP",
    "TokenDecryptionKey",
    "TokenKey",
    "TokenKeyUri",
    "TokenRsaDecryptionKey",
    "close_token_sessions",
    "decryption_uri_for",
    "destroy_token_keys",
    "generate_token_decryption_key",
    "generate_token_key",
    "generate_token_rsa_decryption_key",
    "offers_rsa_oaep",
    "open_token_decryption_key",
    "open_token_key",
    "open_token_sessions",
    "pin_from_env",
]

logger = logging.getLogger(__name__)

#: The environment variable that holds the token's user PIN.
PIN_ENV = "INSITU_PKCS11_PIN"
#: The DER encoding of the Ed25519 curve's OID (1.3.101.112), as CKA_EC_PARAMS.
_ED25519_PARAMS = bytes.fromhex("06032b6570")
#: The DER encoding of the P-256 curve's OID (1.2.840.10045.3.1.7), as CKA_EC_PARAMS.
_P256_CURVE = bytes.fromhex("06082a8648ce3d030107")
#: ``--key-algorithm`` values, and the recorded algorithm each one means.
KEY_ALGORITHMS = {"ed25519": ED25519, "p256": P256}
_PATH_ATTRIBUTES = {"token", "object", "id", "type", "manufacturer", "serial", "model"}


@dataclass(frozen=True)
class TokenKeyUri:
    """The parts of an RFC 7512 PKCS#11 URI that name a key (``pkcs11:token=..;object=..``)."""

    token: str
    object: str
    module: str | None = None

    @classmethod
    def parse(cls, uri: str, *, module: str | None = None) -> TokenKeyUri:
        """Read ``uri``; ``module`` (``--pkcs11-module``) wins over its ``module-path``.

        Raises:
            UsageError: not a ``pkcs11:`` URI, a PIN in it, or no token or object label.

        """
        if not uri.startswith("pkcs11:"):
            raise UsageError(
                f"--key-uri {uri!r} is not a PKCS#11 URI; write it as "
                "'pkcs11:token=NAME;object=LABEL' (RFC 7512)"
            )
        path, _, query = uri[len("pkcs11:") :].partition("?")
        attributes: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, sep, value = part.partition("=")
            if not sep or name not in _PATH_ATTRIBUTES:
                raise UsageError(
                    f"--key-uri: {part!r} is not a path attribute insitu reads; use "
                    "token=NAME and object=LABEL"
                )
            attributes[name] = unquote(value)
        queries = dict(parse_qsl(query, keep_blank_values=True))
        if "pin-value" in queries or "pin-source" in queries:
            raise UsageError(
                f"--key-uri carries a PIN; remove it and set {PIN_ENV} (or answer the "
                "prompt): a PIN in a URI ends up in shell histories and process lists"
            )
        if not attributes.get("token") or not attributes.get("object"):
            raise UsageError(
                f"--key-uri {uri!r} must name the token and the key: "
                "'pkcs11:token=NAME;object=LABEL'"
            )
        return cls(attributes["token"], attributes["object"], module or queries.get("module-path"))

    def __str__(self) -> str:
        return f"pkcs11:token={self.token};object={self.object}"


def pin_from_env() -> str | None:
    """The PIN in ``INSITU_PKCS11_PIN``, or ``None``."""
    return os.environ.get(PIN_ENV) or None


def _library(module: str | None) -> Any:
    try:
        import PyKCS11
    except ImportError as exc:
        raise MissingDependencyError(
            "keys in a PKCS#11 token need PyKCS11, which this install lacks; install the "
            "extra that brings it: pip install 'insitu[hsm]'"
        ) from exc
    if not module:
        raise TokenModuleError(
            "no PKCS#11 module given; pass --pkcs11-module PATH (e.g. "
            "/usr/lib/softhsm/libsofthsm2.so) or add ?module-path=PATH to the URI"
        )
    if not Path(module).is_file():
        raise TokenModuleError(
            f"PKCS#11 module {module} does not exist; install the token's library "
            "(Debian: softhsm2, libtpm2-pkcs11-1) or give its path with --pkcs11-module"
        )
    lib = PyKCS11.PyKCS11Lib()
    try:
        lib.load(module)
    except PyKCS11.PyKCS11Error as exc:
        raise TokenModuleError(
            f"{module} is not a PKCS#11 library that loads ({exc}); give the token's "
            "library with --pkcs11-module"
        ) from exc
    return lib


def _check(exc: Exception, uri: TokenKeyUri, doing: str) -> TokenError:
    """One line for what a token said while ``doing``."""
    import PyKCS11

    code = getattr(exc, "value", None)
    if code in (PyKCS11.CKR_PIN_INCORRECT, PyKCS11.CKR_PIN_LEN_RANGE):
        return WrongPinError(f"token {uri.token!r} refused the PIN; check {PIN_ENV}")
    if code == PyKCS11.CKR_PIN_LOCKED:
        return WrongPinError(
            f"token {uri.token!r} locked its PIN after wrong attempts; unlock it with the "
            "security officer's PIN"
        )
    return TokenError(f"token {uri.token!r} failed while {doing} ({exc}); check the token")


#: The sessions this process has open (weakly: a session nobody holds is gone with it).
_OPEN_SESSIONS: weakref.WeakSet[_Session] = weakref.WeakSet()


def open_token_sessions() -> frozenset[object]:
    """The token sessions this process has open now (see :func:`close_token_sessions`)."""
    return frozenset(_OPEN_SESSIONS)


def close_token_sessions(keep: frozenset[object] = frozenset()) -> int:
    """Close every open token session not in ``keep``; how many were closed.

    The command line calls it when a command ends, keeping what was open before: a
    command's keys are released as the end of its process would release them. It
    matters for a TPM through tpm2-pkcs11, which keeps a key loaded in the TPM while a
    session of it is open; a TPM without a resource manager holds three objects, so a
    later command in the same process (the tests run the CLI in process) could not make
    or load another key. Keys of a closed session are unusable afterwards.
    """
    closing = [session for session in list(_OPEN_SESSIONS) if session not in keep]
    for session in closing:
        session.close()
    return len(closing)


class _Session:
    """A logged-in session with the token ``uri`` names (one per key object)."""

    def __init__(self, uri: TokenKeyUri, pin: str | None) -> None:
        import PyKCS11

        if not pin:
            raise TokenError(
                f"token {uri.token!r} needs its user PIN; set {PIN_ENV} (or run the "
                "command on a terminal to be asked)"
            )
        self.uri = uri
        self.lib = _library(uri.module)
        slots = [
            slot
            for slot in self.lib.getSlotList(tokenPresent=True)
            if self.lib.getTokenInfo(slot).label.rstrip(" \x00") == uri.token
        ]
        if not slots:
            raise TokenKeyNotFoundError(
                f"no token labelled {uri.token!r} in {uri.module}; initialize it (SoftHSM2: "
                f"softhsm2-util --init-token --free --label {uri.token}) or fix the URI"
            )
        try:
            self.session = self.lib.openSession(
                slots[0], PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
            )
        except PyKCS11.PyKCS11Error as exc:
            raise _check(exc, uri, "opening a session") from exc
        _OPEN_SESSIONS.add(self)
        try:
            self.session.login(pin)
        except PyKCS11.PyKCS11Error as exc:
            # A login is the process's, not the session's (PKCS#11 11.6): another key of
            # this process opened the token already.
            if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                raise _check(exc, uri, "logging in") from exc

    def close(self) -> None:
        """Close the session: closing a token's last session logs out and unloads its keys."""
        import PyKCS11

        _OPEN_SESSIONS.discard(self)
        try:
            self.session.closeSession()
        except PyKCS11.PyKCS11Error:
            logger.debug("closing a session of %s failed", self.uri, exc_info=True)

    def find(self, cls: int) -> list[Any]:
        import PyKCS11

        return list(
            self.session.findObjects(
                [(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_LABEL, self.uri.object)]
            )
        )


class TokenKey:
    """A node's private key in a token (Ed25519 or P-256): ``sign`` and ``public_key``.

    Signing is serialized (a PKCS#11 session runs one operation at a time); the ledger
    and the server may sign from several threads.
    """

    def __init__(
        self, session: _Session, private: Any, public: SigningPublicKey, public_object: Any = None
    ) -> None:
        self._session = session
        self._private = private
        self._public = public
        self._public_object = public_object
        self._lock = threading.Lock()
        self._closed = False
        self.uri = session.uri
        #: ``ed25519`` or ``ecdsa-p256-sha256`` (``insitu._signer``).
        self.algorithm = algorithm_of(public)

    def public_key(self) -> SigningPublicKey:
        """The public half (read from the token when the key was opened)."""
        return self._public

    def offers(self, mechanism: str) -> bool:
        """Whether this key's token has ``mechanism`` (a name: ``"CKM_ECDH1_DERIVE"``)."""
        return mechanism in _mechanisms(self._session)

    def sign(self, data: bytes) -> bytes:
        """The recorded signature of ``data`` (``insitu._signer``), made inside the token.

        Ed25519 signs ``data`` (``CKM_EDDSA``); P-256 signs its SHA-256 digest
        (``CKM_ECDSA``, which every token with ECDSA has), so a large message never
        crosses into the token.

        Raises:
            TokenError: the token failed (removed, logged out).

        """
        import PyKCS11

        if self.algorithm == ED25519:
            message, mechanism = data, PyKCS11.CKM_EDDSA
        else:
            message, mechanism = hashlib.sha256(data).digest(), PyKCS11.CKM_ECDSA
        with self._lock:
            try:
                signature = bytes(
                    self._session.session.sign(
                        self._private, message, PyKCS11.Mechanism(mechanism, None)
                    )
                )
            except PyKCS11.PyKCS11Error as exc:
                raise _check(exc, self.uri, "signing") from exc
        return signature if self.algorithm == ED25519 else ecdsa_record(signature)

    def close(self) -> None:
        """Close this key's session (the key is unusable afterwards)."""
        with self._lock:
            self._closed = True
            self._session.close()

    def destroy(self) -> None:
        """Delete the key pair from the token (a workspace that was not made after all)."""
        with self._lock:
            if not self._closed:
                _destroy_objects(self._session, (self._private, self._public_object), self.uri)


def _public_of(session: _Session, public: Any) -> Ed25519PublicKey:
    import PyKCS11

    (point,) = session.session.getAttributeValue(public, [PyKCS11.CKA_EC_POINT])
    raw = bytes(point)
    if len(raw) == 34 and raw[:2] == b"\x04\x20":  # DER OCTET STRING around the key
        raw = raw[2:]
    if len(raw) != 32:
        raise TokenError(
            f"token {session.uri.token!r}: {session.uri.object!r} is not an Ed25519 key "
            f"({len(raw)}-byte public point); give the label of an Ed25519 key"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def _signing_public_of(session: _Session, public: Any) -> SigningPublicKey:
    """The public key of a signing key pair: Ed25519, or P-256 (``CKK_EC``)."""
    import PyKCS11

    (key_type,) = session.session.getAttributeValue(public, [PyKCS11.CKA_KEY_TYPE])
    if key_type != PyKCS11.CKK_EC:
        return _public_of(session, public)
    (point,) = session.session.getAttributeValue(public, [PyKCS11.CKA_EC_POINT])
    raw = bytes(point)
    if len(raw) == 67 and raw[:2] == b"\x04\x41":  # DER OCTET STRING around the point
        raw = raw[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise TokenError(
            f"token {session.uri.token!r}: {session.uri.object!r} is not a P-256 or Ed25519 "
            "key; give the label of the node's signing key"
        ) from None


def _mechanisms(session: _Session) -> set[str]:
    """The names of the mechanisms the session's token offers."""
    import PyKCS11

    try:
        slot = session.session.getSessionInfo().slotID
        return {str(m) for m in session.lib.getMechanismList(slot)}
    except PyKCS11.PyKCS11Error as exc:
        raise _check(exc, session.uri, "listing its mechanisms") from exc


def _choose_algorithm(session: _Session, requested: str | None) -> str:
    """``requested`` (``ed25519`` or ``p256``) if the token has it, else what it has.

    Ed25519 when the token offers ``CKM_EC_EDWARDS_KEY_PAIR_GEN`` and ``CKM_EDDSA``,
    else P-256 with ``CKM_EC_KEY_PAIR_GEN`` and ``CKM_ECDSA``.
    """
    import PyKCS11

    uri = session.uri
    offered = {PyKCS11.CKM.get(m, m) for m in _mechanisms(session)}
    needs = {
        ED25519: {PyKCS11.CKM_EC_EDWARDS_KEY_PAIR_GEN, PyKCS11.CKM_EDDSA},
        P256: {PyKCS11.CKM_EC_KEY_PAIR_GEN, PyKCS11.CKM_ECDSA},
    }
    has = {name for name, mechanisms in needs.items() if mechanisms <= offered}
    if requested is not None:
        algorithm = KEY_ALGORITHMS[requested]
        if algorithm not in has:
            names = ", ".join(sorted(PyKCS11.CKM[m] for m in needs[algorithm] - offered))
            raise TokenError(
                f"token {uri.token!r} cannot make {requested} signing keys (no {names}); "
                "leave out --key-algorithm to use what the token has"
            )
        return algorithm
    for algorithm in (ED25519, P256):
        if algorithm in has:
            return algorithm
    raise TokenError(
        f"token {uri.token!r} has neither Ed25519 (CKM_EDDSA) nor ECDSA P-256 (CKM_ECDSA); "
        "use a token that signs with one of them"
    )


def generate_token_key(
    uri: TokenKeyUri, pin: str | None, *, algorithm: str | None = None
) -> TokenKey:
    """Generate the signing key pair ``uri`` names inside its token.

    ``algorithm`` (``ed25519`` or ``p256``, :data:`KEY_ALGORITHMS`) forces one; by
    default it is Ed25519 when the token has it, else ECDSA P-256. The private key is a
    token object, sensitive, not extractable, usable for signing only. A label already
    in use is refused: two nodes must never share a key.

    Raises:
        TokenError: no PIN, a label in use, or the token cannot make such a key.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the module is missing or not a PKCS#11 library.
        TokenKeyNotFoundError: no token with that label.

    """
    import PyKCS11

    session = _Session(uri, pin)
    if session.find(PyKCS11.CKO_PRIVATE_KEY) or session.find(PyKCS11.CKO_PUBLIC_KEY):
        raise TokenError(
            f"token {uri.token!r} already holds a key labelled {uri.object!r}; choose "
            "another object= label (two nodes must never share a key)"
        )
    chosen = _choose_algorithm(session, algorithm)
    ed = chosen == ED25519
    common = [
        (PyKCS11.CKA_TOKEN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS if ed else PyKCS11.CKK_EC),
        (PyKCS11.CKA_LABEL, uri.object),
    ]
    public_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
        (PyKCS11.CKA_VERIFY, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EC_PARAMS, _ED25519_PARAMS if ed else _P256_CURVE),
        *common,
    ]
    private_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
        (PyKCS11.CKA_SIGN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_PRIVATE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EXTRACTABLE, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_DERIVE, PyKCS11.CK_FALSE),
        # tpm2-pkcs11 refuses an EC key with CKA_DECRYPT given (a TPM key's "decrypt"
        # is another attribute); ECDSA keys decrypt nothing anyway.
        *([(PyKCS11.CKA_DECRYPT, PyKCS11.CK_FALSE)] if ed else []),
        *common,
    ]
    generator = PyKCS11.CKM_EC_EDWARDS_KEY_PAIR_GEN if ed else PyKCS11.CKM_EC_KEY_PAIR_GEN
    try:
        public, private = session.session.generateKeyPair(
            public_template, private_template, mecha=PyKCS11.Mechanism(generator, None)
        )
    except PyKCS11.PyKCS11Error as exc:
        raise TokenError(
            f"token {uri.token!r} cannot generate an {chosen} key ({exc}); use a token "
            f"with {PyKCS11.CKM[generator]}"
        ) from exc
    logger.info("generated the node's %s signing key in %s", chosen, uri)
    return TokenKey(session, private, _signing_public_of(session, public), public)


def open_token_key(uri: TokenKeyUri, pin: str | None) -> TokenKey:
    """The signing key (Ed25519 or P-256) ``uri`` names, opened in its token.

    Raises:
        TokenKeyNotFoundError: no such token, or no key of that label in it.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the module is missing or not a PKCS#11 library.
        TokenError: no PIN, or the object is not an Ed25519 or P-256 key pair.

    """
    import PyKCS11

    session = _Session(uri, pin)
    private, public = session.find(PyKCS11.CKO_PRIVATE_KEY), session.find(PyKCS11.CKO_PUBLIC_KEY)
    if not private or not public:
        raise TokenKeyNotFoundError(
            f"token {uri.token!r} holds no key labelled {uri.object!r}; this workspace's "
            "key is in another token (restore it, or use the token it was made in)"
        )
    return TokenKey(session, private[0], _signing_public_of(session, public[0]))


# -- the decryption key: P-256 ECDH in the token ------------------------------------

#: The DER encoding of the P-256 curve's OID (1.2.840.10045.3.1.7), as CKA_EC_PARAMS.
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
#: What the decryption key's label adds to the signing key's (``object=site-a-decrypt``).
DECRYPT_SUFFIX = "-decrypt"


def decryption_uri_for(signing: TokenKeyUri) -> TokenKeyUri:
    """The URI of the decryption key beside the signing key ``signing`` (same token)."""
    return TokenKeyUri(signing.token, signing.object + DECRYPT_SUFFIX, signing.module)


def _session_for(uri: TokenKeyUri, pin: str | None, beside: TokenKey | None) -> _Session:
    """A session for ``uri``: the logged-in one of ``beside`` when it is in the same token.

    One session and one login per token and process: tpm2-pkcs11 on a TPM without a
    resource manager cannot unseal its wrapping key for a second session.
    """
    if beside is None or beside.uri.token != uri.token or beside.uri.module != uri.module:
        return _Session(uri, pin)
    shared = object.__new__(_Session)
    shared.uri, shared.lib, shared.session = uri, beside._session.lib, beside._session.session
    return shared


class TokenDecryptionKey:
    """A P-256 key agreement key in a token: ``exchange`` and ``public_key``.

    It opens bundles whose recipient entry is ``p256-ecdh`` (``insitu.bundle``'s
    ``P256Agreement``). The private key never leaves the token: ``exchange`` asks the
    token for ``CKM_ECDH1_DERIVE`` (``CKD_NULL``) with the bundle's ephemeral public
    point, into a *session* object (``CKA_TOKEN`` false) that is a generic secret of 32
    bytes, reads that secret's value and destroys the object.

    What leaves the token is the ECDH shared secret of *one* ephemeral key, i.e. of one
    bundle's wrapped data key: the publisher who made the ephemeral key knows it too; it
    reveals nothing of the private key and opens no other bundle (each has its own
    ephemeral key). HKDF and the AES-GCM unwrapping then run in this process, as the
    payload's decryption must anyway (the data key is needed in memory to decrypt a
    model at memory speed). SoftHSM2 2.6 has no ``CKM_HKDF_DERIVE``, so deriving the
    wrapping key inside the token is not possible there; with the secret marked
    non-extractable its value could not be read at all.
    """

    def __init__(
        self,
        session: _Session,
        private: Any,
        public: ec.EllipticCurvePublicKey,
        public_object: Any = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self._session = session
        self._private = private
        self._public = public
        self._public_object = public_object
        # A session shared with the signing key runs one operation at a time: one lock.
        self._lock = lock or threading.Lock()
        self.uri = session.uri
        #: The recipient kind of bundles this key opens (``insitu.bundle``).
        self.algorithm = "p256-ecdh"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half (read from the token when the key was opened)."""
        return self._public

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """The ECDH shared secret with ``peer`` (its x-coordinate, 32 bytes), made in the token.

        Raises:
            ValueError: ``peer`` is not a P-256 key.
            TokenError: the token failed (removed, logged out).

        """
        import PyKCS11

        if peer.curve.name != "secp256r1":
            raise ValueError(f"{peer.curve.name} is not P-256")
        point = peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        template = [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
            (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_GENERIC_SECRET),
            (PyKCS11.CKA_VALUE_LEN, 32),
            (PyKCS11.CKA_TOKEN, PyKCS11.CK_FALSE),
            (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_FALSE),
            (PyKCS11.CKA_EXTRACTABLE, PyKCS11.CK_TRUE),
        ]
        session = self._session.session
        with self._lock:
            try:
                secret = session.deriveKey(
                    self._private, template, PyKCS11.ECDH1_DERIVE_Mechanism(point)
                )
                try:
                    (value,) = session.getAttributeValue(
                        secret, [PyKCS11.CKA_VALUE], allAsBinary=True
                    )
                finally:
                    session.destroyObject(secret)
            except PyKCS11.PyKCS11Error as exc:
                raise _check(exc, self.uri, "deriving a bundle's key") from exc
        if value is None or len(value) != 32:
            raise TokenError(
                f"token {self.uri.token!r} did not return the ECDH secret; check the token"
            )
        return bytes(value)

    def destroy(self) -> None:
        """Delete the key pair from the token (a workspace that was not made after all)."""
        with self._lock:
            _destroy_objects(self._session, (self._private, self._public_object), self.uri)


def _destroy_objects(session: _Session, handles: tuple[Any, ...], uri: TokenKeyUri) -> None:
    """Delete ``handles`` from the token; one that will not go is left with a warning."""
    import PyKCS11

    for handle in handles:
        if handle is None:
            continue
        try:
            session.session.destroyObject(handle)
        except PyKCS11.PyKCS11Error:
            logger.warning("could not delete %s from its token; delete it by hand", uri)


def _p256_public_of(session: _Session, public: Any) -> ec.EllipticCurvePublicKey:
    import PyKCS11

    (point,) = session.session.getAttributeValue(public, [PyKCS11.CKA_EC_POINT])
    raw = bytes(point)
    if len(raw) == 67 and raw[:2] == b"\x04\x41":  # DER OCTET STRING around the point
        raw = raw[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise TokenError(
            f"token {session.uri.token!r}: {session.uri.object!r} is not a P-256 key; give "
            "the label of a P-256 key agreement key"
        ) from None


def generate_token_decryption_key(
    uri: TokenKeyUri, pin: str | None, *, beside: TokenKey | None = None
) -> TokenDecryptionKey:
    """Generate the P-256 key agreement key pair ``uri`` names inside its token.

    ``beside`` is the node's signing key when it is open: its session is used. The
    private key is a token object, sensitive, not extractable, usable for
    ``CKM_ECDH1_DERIVE`` only (``CKA_DERIVE``; no signing, no decryption). A label already
    in use is refused.

    Raises:
        TokenError: no PIN, a label in use, or the token cannot generate P-256 keys.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the module is missing or not a PKCS#11 library.
        TokenKeyNotFoundError: no token with that label.

    """
    import PyKCS11

    session = _session_for(uri, pin, beside)
    if session.find(PyKCS11.CKO_PRIVATE_KEY) or session.find(PyKCS11.CKO_PUBLIC_KEY):
        raise TokenError(
            f"token {uri.token!r} already holds a key labelled {uri.object!r}; choose "
            "another object= label (two nodes must never share a key)"
        )
    common = [
        (PyKCS11.CKA_TOKEN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
        (PyKCS11.CKA_LABEL, uri.object),
    ]
    public_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
        (PyKCS11.CKA_EC_PARAMS, _P256_PARAMS),
        (PyKCS11.CKA_VERIFY, PyKCS11.CK_FALSE),
        *common,
    ]
    private_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
        (PyKCS11.CKA_DERIVE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_PRIVATE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EXTRACTABLE, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_SIGN, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_DECRYPT, PyKCS11.CK_FALSE),
        *common,
    ]
    try:
        public, private = session.session.generateKeyPair(
            public_template,
            private_template,
            mecha=PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN, None),
        )
    except PyKCS11.PyKCS11Error as exc:
        raise TokenError(
            f"token {uri.token!r} cannot generate a P-256 key ({exc}); use a token with "
            "CKM_EC_KEY_PAIR_GEN and CKM_ECDH1_DERIVE"
        ) from exc
    logger.info("generated the node's decryption key in %s", uri)
    lock = (
        beside._lock if beside is not None and session.session is beside._session.session else None
    )
    return TokenDecryptionKey(session, private, _p256_public_of(session, public), public, lock)


def open_token_decryption_key(
    uri: TokenKeyUri, pin: str | None, *, beside: TokenKey | None = None
) -> TokenDecryptionKey | TokenRsaDecryptionKey:
    """The decryption key ``uri`` names, opened in its token (in ``beside``'s session).

    A P-256 key agreement key, or an RSA decryption key (:class:`TokenRsaDecryptionKey`).

    Raises:
        TokenKeyNotFoundError: no such token, or no key of that label in it.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the module is missing or not a PKCS#11 library.
        TokenError: no PIN, or the object is not a P-256 or RSA key pair.

    """
    import PyKCS11

    session = _session_for(uri, pin, beside)
    private, public = session.find(PyKCS11.CKO_PRIVATE_KEY), session.find(PyKCS11.CKO_PUBLIC_KEY)
    if not private or not public:
        raise TokenKeyNotFoundError(
            f"token {uri.token!r} holds no key labelled {uri.object!r}; this workspace's "
            "decryption key is in another token (restore it, or use the token it was made in)"
        )
    lock = (
        beside._lock if beside is not None and session.session is beside._session.session else None
    )
    (key_type,) = session.session.getAttributeValue(public[0], [PyKCS11.CKA_KEY_TYPE])
    if key_type == PyKCS11.CKK_RSA:
        return TokenRsaDecryptionKey(
            session, private[0], _rsa_public_of(session, public[0]), None, lock
        )
    return TokenDecryptionKey(session, private[0], _p256_public_of(session, public[0]), None, lock)


# -- the decryption key: RSA-OAEP in the token (a TPM) ------------------------------

#: The bundle recipient kind of an RSA decryption key (``insitu.bundle``).
RSA_OAEP = "rsa-oaep-sha256"
_RSA_BITS = (3072, 2048)  # the largest the token generates; never less than 2048


class TokenRsaDecryptionKey:
    """An RSA decryption key in a token: ``decrypt`` (OAEP, SHA-256) and ``public_key``.

    It opens bundles whose recipient entry is ``rsa-oaep-sha256`` (``insitu.bundle``'s
    ``RsaDecrypter``): ``decrypt`` asks the token for ``CKM_RSA_PKCS_OAEP`` with SHA-256
    and MGF1-SHA-256 and an empty label (tpm2-pkcs11 1.9 on a TPM refuses a label). What
    leaves the token is the 32-byte secret of one recipient entry of one bundle, which
    the publisher drew; the private key stays there.

    ``C_Decrypt`` is called once with an output buffer of the modulus length: tpm2-pkcs11
    leaves the operation active when a length query fails, and the session (shared with
    the signing key) would refuse every later operation.
    """

    def __init__(
        self,
        session: _Session,
        private: Any,
        public: rsa.RSAPublicKey,
        public_object: Any = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self._session = session
        self._private = private
        self._public = public
        self._public_object = public_object
        self._lock = lock or threading.Lock()
        self._closed = False
        self.uri = session.uri
        #: The recipient kind of bundles this key opens.
        self.algorithm = RSA_OAEP

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half (read from the token when the key was opened)."""
        return self._public

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        """The OAEP (SHA-256, MGF1-SHA-256, no label) plaintext of ``ciphertext``, in the token.

        Raises:
            ValueError: another padding, a ciphertext of another length than the key's, or
                one the token finds invalid.
            TokenError: the token failed (removed, logged out).

        """
        import PyKCS11
        from PyKCS11.LowLevel import ckbytelist

        _check_oaep(padding)
        size = (self._public.key_size + 7) // 8
        if len(ciphertext) != size:
            raise ValueError(f"an RSA-OAEP ciphertext for this key has {size} bytes")
        # The mechanism object owns the parameters' memory: it must outlive the call.
        mechanism = PyKCS11.RSAOAEPMechanism(PyKCS11.CKM_SHA256, PyKCS11.CKG_MGF1_SHA256)
        out = ckbytelist(bytes(size))
        session = self._session.session
        with self._lock:
            rv = session.lib.C_DecryptInit(session.session, mechanism.to_native(), self._private)
            if rv == PyKCS11.CKR_OK:
                rv = session.lib.C_Decrypt(session.session, ckbytelist(ciphertext), out)
        if rv in (PyKCS11.CKR_ENCRYPTED_DATA_INVALID, PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE):
            raise ValueError("the token found the OAEP ciphertext invalid")
        if rv != PyKCS11.CKR_OK:
            raise _check(PyKCS11.PyKCS11Error(rv), self.uri, "decrypting a bundle's key")
        return bytes(out)

    def close(self) -> None:
        """Close this key's session (the key is unusable afterwards)."""
        with self._lock:
            self._closed = True
            self._session.close()

    def destroy(self) -> None:
        """Delete the key pair from the token (a workspace that was not made after all)."""
        with self._lock:
            if not self._closed:
                _destroy_objects(self._session, (self._private, self._public_object), self.uri)


def _check_oaep(given: padding.AsymmetricPadding) -> None:
    if not (
        isinstance(given, padding.OAEP)
        and isinstance(given.algorithm, hashes.SHA256)
        and isinstance(given.mgf, padding.MGF1)
        and isinstance(given.mgf._algorithm, hashes.SHA256)
    ):
        raise TypeError("the token key decrypts RSA-OAEP with SHA-256 and MGF1-SHA-256 only")


def _rsa_public_of(session: _Session, public: Any) -> rsa.RSAPublicKey:
    import PyKCS11

    modulus, exponent = session.session.getAttributeValue(
        public, [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT], allAsBinary=True
    )
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(bytes(exponent), "big"), int.from_bytes(bytes(modulus), "big")
    )
    key = numbers.public_key()
    if key.key_size < 2048:
        raise TokenError(
            f"token {session.uri.token!r}: {session.uri.object!r} is a {key.key_size}-bit RSA "
            "key; bundles need 2048 bits or more"
        )
    return key


def offers_rsa_oaep(key: TokenKey) -> bool:
    """Whether ``key``'s token can generate RSA keys and decrypt with RSA-OAEP."""
    return key.offers("CKM_RSA_PKCS_OAEP") and key.offers("CKM_RSA_PKCS_KEY_PAIR_GEN")


def _rsa_bits(session: _Session) -> int:
    """3072 when the token generates keys that large, else 2048."""
    import PyKCS11

    try:
        slot = session.session.getSessionInfo().slotID
        info = session.lib.getMechanismInfo(slot, "CKM_RSA_PKCS_KEY_PAIR_GEN")
    except PyKCS11.PyKCS11Error as exc:
        raise _check(exc, session.uri, "reading its RSA key sizes") from exc
    return next((bits for bits in _RSA_BITS if info.ulMaxKeySize >= bits), 2048)


def generate_token_rsa_decryption_key(uri: TokenKeyUri, pin: str | None) -> TokenRsaDecryptionKey:
    """Generate the RSA decryption key pair ``uri`` names in its token, in a session of its own.

    3072 bits when the token makes them (swtpm does), else 2048. The private key is a
    token object, sensitive, not extractable, usable for decryption only (``CKA_DECRYPT``;
    no signing). Only the private template's usage is given: tpm2-pkcs11 derives the
    public key's usage from the TPM object and refuses a template that states it. A
    label already in use is refused.

    A TPM without a resource manager holds three transient objects: the caller closes
    the signing key's session first (closing a token's last session logs out and
    unloads its keys) and this key's session after, then opens both in one session.

    Raises:
        TokenError: no PIN, a label in use, or the token cannot generate RSA keys.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the module is missing or not a PKCS#11 library.
        TokenKeyNotFoundError: no token with that label.

    """
    import PyKCS11

    session = _Session(uri, pin)
    if session.find(PyKCS11.CKO_PRIVATE_KEY) or session.find(PyKCS11.CKO_PUBLIC_KEY):
        session.close()
        raise TokenError(
            f"token {uri.token!r} already holds a key labelled {uri.object!r}; choose "
            "another object= label (two nodes must never share a key)"
        )
    bits = _rsa_bits(session)
    common = [
        (PyKCS11.CKA_TOKEN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA),
        (PyKCS11.CKA_LABEL, uri.object),
    ]
    public_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
        (PyKCS11.CKA_MODULUS_BITS, bits),
        (PyKCS11.CKA_PUBLIC_EXPONENT, (0x01, 0x00, 0x01)),
        *common,
    ]
    private_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
        (PyKCS11.CKA_DECRYPT, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_SIGN, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_PRIVATE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EXTRACTABLE, PyKCS11.CK_FALSE),
        *common,
    ]
    try:
        public, private = session.session.generateKeyPair(
            public_template,
            private_template,
            mecha=PyKCS11.Mechanism(PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN, None),
        )
    except PyKCS11.PyKCS11Error as exc:
        session.close()
        raise TokenError(
            f"token {uri.token!r} cannot generate a {bits}-bit RSA key ({exc}); use a token "
            "with CKM_RSA_PKCS_KEY_PAIR_GEN and CKM_RSA_PKCS_OAEP (a TPM without a resource "
            "manager also fails while other keys of this process are loaded: run init alone)"
        ) from exc
    logger.info("generated the node's %d-bit RSA decryption key in %s", bits, uri)
    return TokenRsaDecryptionKey(session, private, _rsa_public_of(session, public), public)


def destroy_token_keys(uri: TokenKeyUri, pin: str | None) -> None:
    """Delete every key object labelled as ``uri`` names (undoing a half-made workspace)."""
    import PyKCS11

    session = _Session(uri, pin)
    try:
        handles = (*session.find(PyKCS11.CKO_PRIVATE_KEY), *session.find(PyKCS11.CKO_PUBLIC_KEY))
        _destroy_objects(session, handles, uri)
    finally:
        session.close()
