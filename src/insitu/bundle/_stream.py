"""Segmented AES-256-GCM (a STREAM construction) and key wrapping for recipients.

Why by hand: ``cryptography`` offers one-shot AES-GCM, which cannot take more than 2 GiB
and needs the whole plaintext in memory twice; no well-kept Python library offers an
online AEAD over segments with a file format we can sign. The construction is the
STREAM of Hoang, Reyhanitabar, Rogaway and Vizar (as in Tink's streaming AEAD and age):

* the payload is cut into segments of ``segment_size`` bytes (the last may be shorter,
  or empty when the payload is empty); each is sealed with AES-256-GCM and a 16-byte tag;
* the 12-byte nonce of segment ``i`` is ``prefix (7 bytes) || i (4 bytes, big endian) ||
  last (1 byte: 1 for the final segment, else 0)``;
* every segment carries the same associated data (the bundle id, name and version), so a
  segment moved to another bundle does not open.

Invariants (each is a property test in ``tests/bundle/test_stream_properties.py``): any
changed byte, any reordered, dropped, duplicated or appended segment, and any truncation
(even at a segment boundary: the last flag no longer matches) makes :func:`decrypt`
raise ``InvalidTag``. Encryption is deterministic given key, prefix, data and associated
data; the delta path relies on it to rebuild a bundle byte for byte.

Speed: segments are sealed and opened with ``encrypt_into``/``decrypt_into`` straight
into one preallocated buffer (about 8 GB/s here, against about 1 GB/s for one-shot calls
that allocate a new object per segment).

Key wrapping: a fresh 32-byte data key per bundle is wrapped for each recipient with an
ephemeral key agreement, HKDF-SHA256 (salt = ephemeral public key || recipient public
key, info bound to the bundle) and AES-256-GCM. A wrapped key moved to another bundle, or
presented to another device, does not open.

Two key agreements, one construction: ``x25519`` (a key in a file) and ``p256-ecdh``
(ECDH on P-256, for keys in PKCS#11 tokens, which often lack X25519: SoftHSM2 does). Only
the shared secret differs (X25519's 32 bytes, or P-256's x-coordinate, what
``CKM_ECDH1_DERIVE`` with ``CKD_NULL`` yields); public keys are raw (32 bytes) or SEC1
uncompressed points (65 bytes). Each recipient entry records ``algorithm`` and ``kdf``
(``hkdf-sha256``) inside the signed header; an entry without them is X25519 (bundles
made before P-256). The algorithm is also bound into HKDF's info (empty for X25519, so
that old bundles open), and an entry is opened only with the algorithm of the device's own
key: a recorded algorithm that was changed, or that the device's key does not have,
refuses the entry rather than trying another agreement.

A third kind, ``rsa-oaep-sha256``, is key *transport*, for tokens that decrypt but do not
agree (a TPM through tpm2-pkcs11 1.9 has ``CKM_RSA_PKCS_OAEP`` and no
``CKM_ECDH1_DERIVE``). It stays the same construction: the publisher draws a fresh
32-byte secret per recipient and encrypts it with RSA-OAEP (SHA-256, MGF1-SHA-256, empty
label) to the recipient's RSA key (2048 bits or more; smaller keys are refused); the
entry's ``ephemeral`` field holds that OAEP ciphertext (the encapsulation, as the
ephemeral public key is for ECDH), and the secret takes the place of the shared secret
in the same HKDF (salt = ciphertext || the recipient's DER SubjectPublicKeyInfo, info =
``_WRAP_INFO`` + `` rsa-oaep-sha256`` + the bundle context) and AES-GCM wrapping of the
data key. Why not OAEP-encrypt the data key itself: the bundle binding would then rest
on the OAEP label, and a TPM refuses labels (``TPM2_RSA_Decrypt`` answered
``TPM_RC_VALUE`` for one through tpm2-pkcs11); through HKDF the binding, and the code
that checks it, are the ones of the other two kinds, and one data key still serves every
recipient. The empty label is fixed, not a choice per bundle. The ciphertext length must
be the key's modulus length, checked before the token is asked: a token sees only
ciphertexts of signed headers of that length.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "AGREEMENTS",
    "DEFAULT_SEGMENT_SIZE",
    "KDF",
    "KEY_SIZE",
    "MIN_RSA_BITS",
    "NONCE_PREFIX_SIZE",
    "RSA_OAEP",
    "TAG_SIZE",
    "DeviceKey",
    "P256Agreement",
    "RecipientKey",
    "RsaDecrypter",
    "agreement_of",
    "ciphertext_length",
    "decrypt",
    "derive_subkey",
    "encrypt",
    "key_id",
    "plaintext_length",
    "unwrap_key",
    "wrap_key",
]

KEY_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
DEFAULT_SEGMENT_SIZE = 1 << 20
MAX_SEGMENTS = 1 << 32
_THREADED_FROM = 8  # segments; below this a thread costs more than it saves
_POOL = 12  # recycled segment buffers when decrypting to a sink
_WRAP_INFO = b"insitu-bundle/1 key-wrap"
_WRAP_NONCE = b"\x00" * 12  # the wrapping key is fresh per (ephemeral key, recipient)
#: The key agreements a recipient entry may record, and what each adds to HKDF's info.
AGREEMENTS = {"x25519": b"", "p256-ecdh": b" p256-ecdh", "rsa-oaep-sha256": b" rsa-oaep-sha256"}
#: The key transport kind (RSA-OAEP, SHA-256, MGF1-SHA-256, empty label).
RSA_OAEP = "rsa-oaep-sha256"
#: The smallest RSA recipient key accepted, in bits.
MIN_RSA_BITS = 2048
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
#: The one key derivation of wrapping keys.
KDF = "hkdf-sha256"


class P256Agreement(Protocol):
    """A P-256 private key that may not show itself: ECDH in a token (``insitu.workspace``)."""

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half."""
        ...

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """The ECDH shared secret with ``peer`` (the x-coordinate, 32 bytes)."""
        ...


class RsaDecrypter(Protocol):
    """An RSA private key that may not show itself: OAEP decryption in a token (a TPM).

    ``cryptography``'s ``RSAPrivateKey`` is one too.
    """

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half."""
        ...

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        """The plaintext of ``ciphertext`` under ``padding`` (here always :data:`_OAEP`)."""
        ...


#: A recipient's public key: X25519, P-256 for ECDH, or RSA for OAEP key transport.
RecipientKey: TypeAlias = X25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
#: A device's private key that opens bundles: X25519, P-256 or RSA in memory, or P-256
#: (ECDH) or RSA (OAEP) in a token.
DeviceKey: TypeAlias = (
    X25519PrivateKey | ec.EllipticCurvePrivateKey | P256Agreement | rsa.RSAPrivateKey | RsaDecrypter
)


def _nonce(prefix: bytes, index: int, *, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _segment_count(plain_length: int, segment_size: int) -> int:
    # An empty payload is still one (empty, final) segment: truncation to nothing fails.
    return max(1, -(-plain_length // segment_size))


def ciphertext_length(plain_length: int, segment_size: int) -> int:
    """Bytes of ciphertext for ``plain_length`` bytes of plaintext."""
    return plain_length + TAG_SIZE * _segment_count(plain_length, segment_size)


def plaintext_length(cipher_length: int, segment_size: int) -> int:
    """Bytes of plaintext in ``cipher_length`` bytes of ciphertext.

    Raises:
        ValueError: no plaintext length encrypts to ``cipher_length`` bytes.

    """
    full, rest = divmod(cipher_length, segment_size + TAG_SIZE)
    if rest == 0 and full > 0:
        return full * segment_size
    # A final segment holds at least one byte, unless it is the only one (empty payload).
    if rest < TAG_SIZE or (rest == TAG_SIZE and full > 0):
        raise ValueError(f"{cipher_length} bytes is not a valid ciphertext length")
    return full * segment_size + rest - TAG_SIZE


def _check(key: bytes, prefix: bytes, segment_size: int) -> None:
    if len(key) != KEY_SIZE or len(prefix) != NONCE_PREFIX_SIZE or segment_size < 1:
        raise ValueError("bad key, nonce prefix or segment size")


def encrypt(
    key: bytes,
    prefix: bytes,
    plaintext: bytes | bytearray | memoryview,
    associated_data: bytes,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> bytearray:
    """Seal ``plaintext`` into a new buffer of :func:`ciphertext_length` bytes."""
    _check(key, prefix, segment_size)
    data = memoryview(plaintext).cast("B")
    count = _segment_count(len(data), segment_size)
    if count > MAX_SEGMENTS:
        raise ValueError("payload too large for the 32-bit segment counter")
    out = bytearray(ciphertext_length(len(data), segment_size))
    view = memoryview(out)
    aead = AESGCM(key)
    for index in range(count):
        start = index * segment_size
        chunk = data[start : start + segment_size]
        at = index * (segment_size + TAG_SIZE)
        nonce = _nonce(prefix, index, last=index == count - 1)
        aead.encrypt_into(nonce, chunk, associated_data, view[at : at + len(chunk) + TAG_SIZE])
    return out


def decrypt(
    key: bytes,
    prefix: bytes,
    ciphertext: bytes | bytearray | memoryview,
    associated_data: bytes,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    into: Any = None,
    hasher: Any = None,
    sink: Callable[[memoryview], None] | None = None,
) -> Any:
    """Open ``ciphertext`` sealed by :func:`encrypt`; return the plaintext buffer.

    ``into`` is a writable buffer of exactly the plaintext length (default: a new
    ``bytearray``); ``hasher`` (a ``hashlib`` object) is fed each segment while it is
    still in the CPU cache, which saves a second pass over memory. With ``sink``, each
    segment is decrypted into a small recycled buffer and handed to ``sink`` instead
    (nothing is returned): no buffer of the whole plaintext is ever allocated.

    If this raises, whatever ``into`` or ``sink`` received is unauthenticated.

    Raises:
        InvalidTag: any byte, segment order, or the length is not as sealed.
        ValueError: ``into`` has the wrong length.

    """
    _check(key, prefix, segment_size)
    data = memoryview(ciphertext).cast("B")
    try:
        plain_length = plaintext_length(len(data), segment_size)
    except ValueError:
        raise InvalidTag from None
    count = _segment_count(plain_length, segment_size)
    if sink is not None:
        _decrypt_to_sink(
            AESGCM(key),
            prefix,
            data,
            associated_data,
            segment_size=segment_size,
            sink=sink,
            hasher=hasher,
        )
        return None
    out = bytearray(plain_length) if into is None else into
    view = memoryview(out).cast("B")
    if len(view) != plain_length:
        raise ValueError(f"the output buffer must hold {plain_length} bytes")
    aead = AESGCM(key)
    with _Pipeline(hasher, threaded=count >= _THREADED_FROM) as feed:
        for index in range(count):
            start = index * segment_size
            size = min(segment_size, plain_length - start)
            at = index * (segment_size + TAG_SIZE)
            nonce = _nonce(prefix, index, last=index == count - 1)
            segment = view[start : start + size]
            aead.decrypt_into(nonce, data[at : at + size + TAG_SIZE], associated_data, segment)
            feed(segment)
    return out


def _decrypt_to_sink(
    aead: AESGCM,
    prefix: bytes,
    data: memoryview,
    associated_data: bytes,
    *,
    segment_size: int,
    sink: Callable[[memoryview], None],
    hasher: Any,
) -> None:
    plain_length = plaintext_length(len(data), segment_size)
    count = _segment_count(plain_length, segment_size)
    # A buffer goes back to the pool only once it has been hashed (in the hash thread).
    pool: queue.Queue[bytearray] = queue.Queue()
    for _ in range(min(count, _POOL)):
        pool.put(bytearray(segment_size))
    with _Pipeline(hasher, threaded=count >= _THREADED_FROM) as feed:
        for index in range(count):
            size = min(segment_size, plain_length - index * segment_size)
            at = index * (segment_size + TAG_SIZE)
            nonce = _nonce(prefix, index, last=index == count - 1)
            buffer = pool.get()
            segment = memoryview(buffer)[:size]
            aead.decrypt_into(nonce, data[at : at + size + TAG_SIZE], associated_data, segment)
            sink(segment)
            feed(segment, lambda buffer=buffer: pool.put(buffer))


class _Pipeline:
    """Feeds decrypted segments to a hash, in a second thread for large payloads.

    ``hashlib`` releases the GIL on large updates, so segment ``i`` is hashed while
    segment ``i + 1`` is decrypted (the digest is the same: segments arrive in order on
    one queue, and one thread updates the hash). The context manager returns only after
    every segment fed has been hashed, so the caller compares a complete digest.
    """

    def __init__(self, hasher: Any, *, threaded: bool) -> None:
        self.hasher = hasher
        self.threaded = threaded and hasher is not None
        self.queue: queue.Queue[tuple[memoryview, Callable[[], None] | None] | None]
        self.queue = queue.Queue(maxsize=8)
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            segment, done = item
            self.hasher.update(segment)
            if done is not None:
                done()

    def _direct(self, segment: memoryview, done: Callable[[], None] | None = None) -> None:
        if self.hasher is not None:
            self.hasher.update(segment)
        if done is not None:
            done()

    def _queued(self, segment: memoryview, done: Callable[[], None] | None = None) -> None:
        self.queue.put((segment, done))

    def __enter__(self) -> Callable[..., None]:
        if not self.threaded:
            return self._direct
        self.thread = threading.Thread(target=self._run, name="insitu-hash", daemon=True)
        self.thread.start()
        return self._queued

    def __exit__(self, *exc: object) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()


def derive_subkey(key: bytes, purpose: bytes) -> bytes:
    """A key for another purpose (e.g. deltas), independent of ``key`` for AES-GCM use.

    A delta is sealed with a subkey so that it never shares a (key, nonce) pair with the
    bundle payload, even though both belong to the same bundle.
    """
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=b"insitu-subkey/" + purpose).derive(key)


def _raw(public: RecipientKey) -> bytes:
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"RSA recipient keys must have at least {MIN_RSA_BITS} bits, this one has "
                f"{public.key_size}; make a larger key"
            )
        return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name != "secp256r1":
            raise ValueError(f"recipient keys on {public.curve.name} are not supported; use P-256")
        return public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def agreement_of(public: RecipientKey) -> str:
    """The kind of a recipient key: ``"x25519"``, ``"p256-ecdh"`` or ``"rsa-oaep-sha256"``."""
    if isinstance(public, rsa.RSAPublicKey):
        return RSA_OAEP
    return "p256-ecdh" if isinstance(public, ec.EllipticCurvePublicKey) else "x25519"


def key_id(public: RecipientKey | bytes) -> str:
    """The id of a device (recipient) key: the first 16 bytes of SHA-256, in hex.

    Of the raw X25519 key, of the uncompressed P-256 point (65 bytes), or of the RSA key's
    DER SubjectPublicKeyInfo: ids of the kinds never meet.
    """
    raw = public if isinstance(public, bytes) else _raw(public)
    return hashlib.sha256(raw).hexdigest()[:32]


def _kek(
    shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes, algorithm: str
) -> bytes:
    info = _WRAP_INFO + AGREEMENTS[algorithm] + context
    hkdf = HKDF(hashes.SHA256(), KEY_SIZE, salt=ephemeral + recipient, info=info)
    return hkdf.derive(shared)


def wrap_key(data_key: bytes, recipient: RecipientKey, context: bytes) -> dict[str, Any]:
    """Wrap ``data_key`` for ``recipient``; ``context`` binds it to one bundle."""
    recipient_raw = _raw(recipient)
    shared: bytes
    if isinstance(recipient, rsa.RSAPublicKey):
        shared = os.urandom(KEY_SIZE)
        ephemeral_raw = recipient.encrypt(shared, _OAEP)
    elif isinstance(recipient, ec.EllipticCurvePublicKey):
        ec_ephemeral = ec.generate_private_key(ec.SECP256R1())
        ephemeral_raw = _raw(ec_ephemeral.public_key())
        shared = ec_ephemeral.exchange(ec.ECDH(), recipient)
    else:
        x_ephemeral = X25519PrivateKey.generate()
        ephemeral_raw = _raw(x_ephemeral.public_key())
        shared = x_ephemeral.exchange(recipient)
    algorithm = agreement_of(recipient)
    kek = _kek(shared, ephemeral_raw, recipient_raw, context, algorithm)
    return {
        "keyid": key_id(recipient_raw),
        "algorithm": algorithm,
        "kdf": KDF,
        "ephemeral": ephemeral_raw.hex(),
        "wrapped": AESGCM(kek).encrypt(_WRAP_NONCE, data_key, context).hex(),
    }


def _shared(device: DeviceKey, algorithm: str, ephemeral_raw: bytes) -> bytes:
    """The agreement of ``device`` with the entry's ephemeral key, under ``algorithm``.

    Raises:
        ValueError: ``algorithm`` is not the one of ``device``'s key, or the ephemeral
            key is not a key of it (an entry whose algorithm was changed).

    """
    if isinstance(device, X25519PrivateKey):
        if algorithm != "x25519":
            raise ValueError(f"an X25519 key cannot open a {algorithm!r} entry")
        return device.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
    public = device.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        if algorithm != RSA_OAEP:
            raise ValueError(f"an RSA key cannot open a {algorithm!r} entry")
        if len(ephemeral_raw) != (public.key_size + 7) // 8:
            raise ValueError("the OAEP ciphertext does not have the key's length")
        secret = cast(RsaDecrypter, device).decrypt(ephemeral_raw, _OAEP)
        if len(secret) != KEY_SIZE:
            raise ValueError("the OAEP plaintext is not a 32-byte secret")
        return secret
    if algorithm != "p256-ecdh":
        raise ValueError(f"a P-256 key cannot open a {algorithm!r} entry")
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral_raw)
    if isinstance(device, ec.EllipticCurvePrivateKey):
        return device.exchange(ec.ECDH(), peer)
    return cast(P256Agreement, device).exchange(peer)


def unwrap_key(recipients: list[dict[str, Any]], device: DeviceKey, context: bytes) -> bytes:
    """The data key wrapped for ``device`` among ``recipients``.

    Raises:
        LookupError: ``device`` is not among the recipients.
        InvalidTag: its entry does not open (tampered, or moved from another bundle).
        ValueError: its entry records another key agreement or KDF than ``device``'s
            (changed), or an ephemeral key that is not one.

    """
    device_raw = _raw(device.public_key())
    wanted = key_id(device_raw)
    for entry in recipients:
        if entry.get("keyid") != wanted:
            continue
        algorithm = entry.get("algorithm", "x25519")
        if algorithm not in AGREEMENTS or entry.get("kdf", KDF) != KDF:
            raise ValueError(f"unknown key agreement {algorithm!r} or KDF {entry.get('kdf')!r}")
        ephemeral_raw = bytes.fromhex(entry["ephemeral"])
        shared = _shared(device, algorithm, ephemeral_raw)
        kek = _kek(shared, ephemeral_raw, device_raw, context, algorithm)
        return AESGCM(kek).decrypt(_WRAP_NONCE, bytes.fromhex(entry["wrapped"]), context)
    raise LookupError(wanted)
