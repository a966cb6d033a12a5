r"""Deltas between two bundles, and the rebuild of the new bundle on a device.

A bundle's payload is encrypted with a fresh data key, so two versions share no bytes
and a delta must be made between the *plaintext* models. A bundle delta is therefore:

    b"INSITUD\x01", 4-byte header length, canonical JSON header
        {"base_bundle_sha256", "target_bundle_sha256", "target_bundle_length",
         "nonce_prefix" (of the delta's own encryption, or null)}
    the new bundle's header, verbatim (magic, length, signed JSON with signatures)
    the model delta (``_tensor_delta``), sealed under a subkey of the new data key

On the device, :func:`apply_bundle_delta` unwraps the new data key with the device key,
opens the model delta, applies it to the installed model, seals the result exactly as
the new header says (encryption is deterministic given key, nonce prefix and data) and
prepends the header: the result is the new bundle, byte for byte. Its SHA-256 must then
equal the digest the *signed TUF metadata* gives for the full bundle; the digest inside
the delta header is only a hint. A delta that does not rebuild it is refused and the
full bundle is downloaded instead.

The model delta is sealed under ``derive_subkey(data_key, b"delta")`` with its own nonce
prefix, so it never reuses a (key, nonce) pair of the payload; only devices that can open
the new bundle can read the delta.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag

from insitu._canonical import canonical_bytes
from insitu.bundle import _stream, _tensor_delta
from insitu.bundle._format import Bundle, context_of, seal_payload
from insitu.bundle._verify import data_key_for, decrypt_payload
from insitu.errors import DeltaError, DeltaMismatchError, MalformedBundleError

__all__ = ["BUNDLE_DELTA_MAGIC", "apply_bundle_delta", "make_bundle_delta"]

BUNDLE_DELTA_MAGIC = b"INSITUD\x01"
_MAX_HEADER = 1 << 20


def make_bundle_delta(
    old_bundle: bytes, new_bundle: bytes, *, publisher_key: _stream.DeviceKey | None
) -> bytes:
    """A delta from ``old_bundle`` to ``new_bundle`` (the publisher must be a recipient).

    Raises:
        WrongDeviceKeyError: an encrypted bundle that ``publisher_key`` cannot open.

    """
    old, new = Bundle.parse(old_bundle), Bundle.parse(new_bundle)
    old_model = decrypt_payload(old, publisher_key)
    new_model = decrypt_payload(new, publisher_key)
    inner = _tensor_delta.diff(bytes(old_model), bytes(new_model))
    nonce_prefix: bytes | None = None
    if new.encrypted:
        subkey = _stream.derive_subkey(data_key_for(new, publisher_key), b"delta")
        nonce_prefix = secrets.token_bytes(_stream.NONCE_PREFIX_SIZE)
        inner = bytes(_stream.encrypt(subkey, nonce_prefix, inner, context_of(new.signed)))
    header = canonical_bytes(
        {
            "base_bundle_sha256": hashlib.sha256(old_bundle).hexdigest(),
            "target_bundle_sha256": hashlib.sha256(new_bundle).hexdigest(),
            "target_bundle_length": len(new_bundle),
            "nonce_prefix": nonce_prefix.hex() if nonce_prefix else None,
            "name": new.name,
            "from_version": old.version,
            "to_version": new.version,
        }
    )
    return b"".join(
        [BUNDLE_DELTA_MAGIC, len(header).to_bytes(4, "big"), header, new.header_bytes, inner]
    )


def _parse(delta: bytes | memoryview) -> tuple[dict[str, Any], Bundle]:
    view = memoryview(delta).cast("B")
    if bytes(view[:8]) != BUNDLE_DELTA_MAGIC:
        raise DeltaError("not an insitu bundle delta (bad magic)")
    length = int.from_bytes(view[8:12], "big")
    if length > _MAX_HEADER or 12 + length > len(view):
        raise DeltaError("the bundle delta header is truncated")
    try:
        header = json.loads(bytes(view[12 : 12 + length]))
        # The embedded bundle header is parsed as a bundle whose "payload" is the rest.
        embedded = Bundle.parse(view[12 + length :])
    except (ValueError, MalformedBundleError) as exc:
        raise DeltaError(f"the bundle delta is malformed ({exc})") from exc
    return header, embedded


def apply_bundle_delta(
    installed_bundle: bytes,
    installed_model: bytes | bytearray,
    delta: bytes,
    device_key: _stream.DeviceKey | None,
) -> bytes:
    """Rebuild the new bundle from the installed one and ``delta``.

    ``installed_model`` is the verified plaintext of ``installed_bundle``. The caller must
    still compare the result's SHA-256 with the signed metadata and verify the bundle.

    Raises:
        DeltaError: malformed, or made against another installed bundle.
        DeltaMismatchError: the model or the bundle does not rebuild to the named digest.
        WrongDeviceKeyError: the new bundle is not encrypted for ``device_key``.

    """
    header, embedded = _parse(delta)
    if header.get("base_bundle_sha256") != hashlib.sha256(installed_bundle).hexdigest():
        raise DeltaError("this delta was made against another installed bundle")
    inner: bytes | bytearray | memoryview = embedded.payload
    new_header = embedded.header_bytes
    # The embedded "payload" view is the sealed model delta; the new bundle's own payload
    # is rebuilt below.
    data_key: bytes | None = None
    if embedded.encrypted:
        data_key = data_key_for(embedded, device_key)
        subkey = _stream.derive_subkey(data_key, b"delta")
        try:
            inner = _stream.decrypt(
                subkey, bytes.fromhex(header["nonce_prefix"]), inner, context_of(embedded.signed)
            )
        except (InvalidTag, KeyError, TypeError, ValueError) as exc:
            raise DeltaError("the delta does not decrypt (tampered or truncated)") from exc
    new_model = _tensor_delta.apply(installed_model, inner)
    payload: bytes | bytearray = new_model
    if data_key is not None:
        payload = seal_payload(embedded.signed, new_model, data_key)
    rebuilt = new_header + bytes(payload)
    if hashlib.sha256(rebuilt).hexdigest() != header.get("target_bundle_sha256"):
        raise DeltaMismatchError("the delta does not rebuild the bundle it names")
    return rebuilt
