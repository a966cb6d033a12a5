"""Model bundles: signed, encrypted ONNX models with a model card, and deltas between them.

Start with :func:`create_bundle` (publisher side) and :class:`BundleVerifier` (device
side); ``docs/supply-chain.md`` describes the format and the threat model. A bundle made
by :func:`bundle_model` also carries a CycloneDX ML-BOM and an OpenSSF model signature
(:func:`verified_bom`, :func:`export_bundle`).

Layer 6 (beside ``insitu.training``, which it never imports): imports
``insitu.workspace``, ``insitu.audit`` and the ONNX session leaf ``insitu._ort``.
"""

from __future__ import annotations

from insitu.bundle._card import ModelCard, SemVer, schema_of
from insitu.bundle._delta import apply_bundle_delta, make_bundle_delta
from insitu.bundle._export import export_bundle, verified_bom, verify_command
from insitu.bundle._format import BUNDLE_MAGIC, Bundle, create_bundle, publisher_key_id
from insitu.bundle._load import load_session
from insitu.bundle._publish import bundle_model
from insitu.bundle._stream import DeviceKey, RecipientKey
from insitu.bundle._stream import key_id as device_key_id
from insitu.bundle._verify import BundleVerifier, OpenedBundle

__all__ = [
    "BUNDLE_MAGIC",
    "Bundle",
    "BundleVerifier",
    "DeviceKey",
    "ModelCard",
    "OpenedBundle",
    "RecipientKey",
    "SemVer",
    "apply_bundle_delta",
    "bundle_model",
    "create_bundle",
    "device_key_id",
    "export_bundle",
    "load_session",
    "make_bundle_delta",
    "publisher_key_id",
    "schema_of",
    "verified_bom",
    "verify_command",
]
