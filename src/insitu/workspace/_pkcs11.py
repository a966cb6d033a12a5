"""A node's signing key in a PKCS#11 token: generated there, used there, never exported.

``insitu init --key-uri 'pkcs11:token=NAME;object=LABEL'`` asks the token (a hardware
security module, a smart card, SoftHSM2, a TPM through tpm2-pkcs11) to generate the
node's Ed25519 key pair with the private half *sensitive* and *not extractable*; the
workspace keeps only the public key and the URI. Every signature (ledger entries and
tree heads, bundles) is then made by the token (``CKM_EDDSA``): a copy of the workspace
on another machine holds no key to sign with.

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

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from insitu.errors import (
    MissingDependencyError,
    TokenError,
    TokenKeyNotFoundError,
    TokenModuleError,
    UsageError,
    WrongPinError,
)

__all__ = [
    "PIN_ENV",
    "TokenKey",
    "TokenKeyUri",
    "generate_token_key",
    "open_token_key",
    "pin_from_env",
]

logger = logging.getLogger(__name__)

#: The environment variable that holds the token's user PIN.
PIN_ENV = "INSITU_PKCS11_PIN"
#: The DER encoding of the Ed25519 curve's OID (1.3.101.112), as CKA_EC_PARAMS.
_ED25519_PARAMS = bytes.fromhex("06032b6570")
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
        try:
            self.session.login(pin)
        except PyKCS11.PyKCS11Error as exc:
            # A login is the process's, not the session's (PKCS#11 11.6): another key of
            # this process opened the token already.
            if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                raise _check(exc, uri, "logging in") from exc

    def find(self, cls: int) -> list[Any]:
        import PyKCS11

        return list(
            self.session.findObjects(
                [(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_LABEL, self.uri.object)]
            )
        )


class TokenKey:
    """An Ed25519 private key in a token: ``sign`` and ``public_key``, as cryptography's.

    Signing is serialized (a PKCS#11 session runs one operation at a time); the ledger
    and the server may sign from several threads.
    """

    def __init__(
        self, session: _Session, private: Any, public: Ed25519PublicKey, public_object: Any = None
    ) -> None:
        self._session = session
        self._private = private
        self._public = public
        self._public_object = public_object
        self._lock = threading.Lock()
        self.uri = session.uri

    def public_key(self) -> Ed25519PublicKey:
        """The public half (read from the token when the key was opened)."""
        return self._public

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``, made inside the token.

        Raises:
            TokenError: the token failed (removed, logged out).

        """
        import PyKCS11

        with self._lock:
            try:
                signature = self._session.session.sign(
                    self._private, data, PyKCS11.Mechanism(PyKCS11.CKM_EDDSA, None)
                )
            except PyKCS11.PyKCS11Error as exc:
                raise _check(exc, self.uri, "signing") from exc
        return bytes(signature)

    def destroy(self) -> None:
        """Delete the key pair from the token (a workspace that was not made after all)."""
        import PyKCS11

        with self._lock:
            for handle in (self._private, self._public_object):
                if handle is None:
                    continue
                try:
                    self._session.session.destroyObject(handle)
                except PyKCS11.PyKCS11Error:
                    logger.warning(
                        "could not delete %s from its token; delete it by hand", self.uri
                    )


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


def generate_token_key(uri: TokenKeyUri, pin: str | None) -> TokenKey:
    """Generate the Ed25519 key pair ``uri`` names inside its token.

    The private key is a token object, sensitive, not extractable, usable for signing
    only. A label already in use is refused: two nodes must never share a key.

    Raises:
        TokenError: no PIN, or the token cannot generate Ed25519 keys.
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
    common = [
        (PyKCS11.CKA_TOKEN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS),
        (PyKCS11.CKA_LABEL, uri.object),
    ]
    public_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
        (PyKCS11.CKA_VERIFY, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EC_PARAMS, _ED25519_PARAMS),
        *common,
    ]
    private_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
        (PyKCS11.CKA_SIGN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_PRIVATE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EXTRACTABLE, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_DECRYPT, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_DERIVE, PyKCS11.CK_FALSE),
        *common,
    ]
    try:
        public, private = session.session.generateKeyPair(
            public_template,
            private_template,
            mecha=PyKCS11.Mechanism(PyKCS11.CKM_EC_EDWARDS_KEY_PAIR_GEN, None),
        )
    except PyKCS11.PyKCS11Error as exc:
        raise TokenError(
            f"token {uri.token!r} cannot generate an Ed25519 key ({exc}); use a token "
            "with CKM_EC_EDWARDS_KEY_PAIR_GEN (SoftHSM2 2.6 or newer)"
        ) from exc
    logger.info("generated the node's signing key in %s", uri)
    return TokenKey(session, private, _public_of(session, public), public)


def open_token_key(uri: TokenKeyUri, pin: str | None) -> TokenKey:
    """The Ed25519 key ``uri`` names, opened in its token for signing.

    Raises:
        TokenKeyNotFoundError: no such token, or no key of that label in it.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the module is missing or not a PKCS#11 library.
        TokenError: no PIN, or the object is not an Ed25519 key pair.

    """
    import PyKCS11

    session = _Session(uri, pin)
    private, public = session.find(PyKCS11.CKO_PRIVATE_KEY), session.find(PyKCS11.CKO_PUBLIC_KEY)
    if not private or not public:
        raise TokenKeyNotFoundError(
            f"token {uri.token!r} holds no key labelled {uri.object!r}; this workspace's "
            "key is in another token (restore it, or use the token it was made in)"
        )
    return TokenKey(session, private[0], _public_of(session, public[0]))
