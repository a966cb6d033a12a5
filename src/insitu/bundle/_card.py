"""The model card inside every bundle, and the semantic versions that order bundles.

A card says what the model is (name, version, input and output schema), how good it is
(metrics), what privacy it cost (epsilon, delta and the accountant that computed them),
where it came from (the ledger entries of its training rounds and the hash of the data
schema), and optionally the differentially private reference profile of its training
data that drift monitoring compares with (``insitu.drift``; absent from the signed form
when there is none, so older cards keep their bytes). It is signed with the bundle, so
none of it can be changed in transit.

An operator who wants the fleet back on an old model publishes it again under a *new*
version (TUF and the update client refuse downgrades); ``republishes`` records which
version it is a copy of, so the card says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import total_ordering
from typing import Any

from insitu._canonical import canonical_bytes
from insitu.errors import MalformedBundleError, UsageError

__all__ = ["ModelCard", "SemVer", "schema_of"]

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?$"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@total_ordering
@dataclass(frozen=True)
class SemVer:
    """A semantic version (MAJOR.MINOR.PATCH[-PRERELEASE]; build metadata is refused).

    Ordering follows semver 2.0.0 section 11: a pre-release sorts before its release,
    numeric identifiers compare as numbers and before alphanumeric ones.
    """

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SemVer:
        """Parse ``text``; raise :class:`UsageError` naming the expected form."""
        match = _SEMVER.match(text)
        if not match:
            raise UsageError(
                f"version {text!r} is not a semantic version; use MAJOR.MINOR.PATCH, "
                "e.g. 1.4.0 or 2.0.0-rc.1"
            )
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre)

    def _key(self) -> tuple[Any, ...]:
        pre: tuple[Any, ...] = tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part) for part in self.prerelease
        )
        # A release (no pre-release) sorts after every pre-release of the same triple.
        return (self.major, self.minor, self.patch, not self.prerelease, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return bool(self._key() < other._key())

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{'.'.join(self.prerelease)}" if self.prerelease else base


def check_name(name: str) -> str:
    """A model name: lower case letters, digits, ``.``, ``_`` and ``-``; used in paths."""
    if not _NAME.match(name):
        raise UsageError(
            f"model name {name!r} is not valid; use 1-64 lower-case letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def schema_of(model: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The graph inputs and outputs of a serialized ONNX model: name, element type, shape.

    Raises:
        MalformedBundleError: ``model`` is not an ONNX model.

    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(model)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise MalformedBundleError(
            f"the model is not a valid ONNX file ({exc}); export it again with onnx"
        ) from exc
    if not proto.graph.node:
        raise MalformedBundleError("the model has no graph nodes: is it an ONNX model file?")
    initializers = {t.name for t in proto.graph.initializer}

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [
            d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
            for d in tensor.shape.dim
        ]
        return {
            "name": value.name,
            "type": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(),
            "shape": shape,
        }

    inputs = [describe(v) for v in proto.graph.input if v.name not in initializers]
    outputs = [describe(v) for v in proto.graph.output]
    return inputs, outputs


@dataclass(frozen=True)
class ModelCard:
    """What a bundle's model is, how good it is, what privacy it cost, where it came from.

    ``privacy`` is ``{"epsilon": float, "delta": float, "accountant": str}`` or ``None``
    (trained without differential privacy: the card says so, it is not left blank).
    ``provenance`` holds ``training_rounds`` (ledger ``seq``, ``type`` and ``hash`` of each
    training entry, so an auditor can find them with ``insitu audit``), the ``node`` whose
    ledger holds them, and ``data_schema_sha256``; for a model traced to a federated run,
    ``run``, ``run_entry``, ``epsilon_recorded`` and ``delta_recorded``, and for a model
    ``insitu optimize`` chose, ``optimized_from`` (``insitu.bundle._provenance``).
    """

    name: str
    version: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    republishes: str | None = None
    #: The DP reference profile of the training data (``insitu.drift``), or ``None``.
    drift_reference: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        SemVer.parse(self.version)
        if self.republishes is not None:
            SemVer.parse(self.republishes)
        if self.privacy is not None:
            eps, delta = self.privacy.get("epsilon"), self.privacy.get("delta")
            if not isinstance(eps, int | float) or eps < 0:
                raise UsageError("privacy epsilon must be a number >= 0")
            if not isinstance(delta, int | float) or not 0 <= delta < 1:
                raise UsageError("privacy delta must be a number in [0, 1)")

    @property
    def semver(self) -> SemVer:
        """The version, parsed."""
        return SemVer.parse(self.version)

    def to_json(self) -> dict[str, Any]:
        """The card as a JSON object (the form that is signed)."""
        return {
            "name": self.name,
            "version": self.version,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "privacy": self.privacy,
            "provenance": self.provenance,
            "description": self.description,
            "republishes": self.republishes,
        } | ({"drift_reference": self.drift_reference} if self.drift_reference else {})

    def to_bytes(self) -> bytes:
        """The canonical JSON bytes whose digest the manifest lists."""
        return canonical_bytes(self.to_json())

    @classmethod
    def from_json(cls, doc: Any) -> ModelCard:
        """Read a card; raise :class:`MalformedBundleError` when it is not one."""
        try:
            return cls(
                name=doc["name"],
                version=doc["version"],
                inputs=list(doc["inputs"]),
                outputs=list(doc["outputs"]),
                metrics=dict(doc.get("metrics") or {}),
                privacy=doc.get("privacy"),
                provenance=dict(doc.get("provenance") or {}),
                description=str(doc.get("description") or ""),
                republishes=doc.get("republishes"),
                drift_reference=doc.get("drift_reference"),
            )
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            raise MalformedBundleError(f"the bundle's model card is invalid ({exc})") from exc
