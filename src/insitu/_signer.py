"""What signs for a node: an Ed25519 key in a file, or one in a PKCS#11 token.

A leaf, so that the ledger, bundles and the workspace name the same type. cryptography's
``Ed25519PrivateKey`` is one; ``insitu.workspace``'s token key is the other (its private
half never leaves the token, so it offers ``sign`` and ``public_key`` and nothing more).
"""

from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["Ed25519Signer"]


class Ed25519Signer(Protocol):
    """Signs with an Ed25519 private key it may not be able to show."""

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        ...

    def public_key(self) -> Ed25519PublicKey:
        """The public half."""
        ...
