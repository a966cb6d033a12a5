"""The machine-readable bill of materials of a bundle: a CycloneDX 1.6 ML-BOM.

What it lists (``insitu bundle bom`` shows it; ``docs/supply-chain.md`` has an example):

* the model (``metadata.component``, type ``machine-learning-model``): name, version,
  SHA-256 and SHA-512 of ``model.onnx``, and its ``modelCard``: ``modelParameters``
  (task, input and output formats, the data set), ``quantitativeAnalysis`` (the card's
  metrics; the central accuracy, epsilon and delta the ledger records for the run; the
  membership-attack AUC with its interval and the one-run lower bound on epsilon when
  the publisher's ledger holds those audits), ``considerations`` (privacy limits and
  what the audits found);
* the data set (type ``data``): its name and schema digest, never a record;
* the packages the runtime loads (``onnxruntime``, ``numpy``, ``onnx``, ``cryptography``,
  ``insitu``) with the versions the publisher had, as ``pkg:pypi`` package URLs, and the
  dependency graph from the model to them.

Each figure taken from the ledger is named by its entry (``insitu:ledger:*`` properties:
sequence number and hash), so an auditor finds it with ``insitu audit``.

cyclonedx-python-lib (11.12) builds the BOM, but does not model ``modelCard`` or a
component's ``data`` yet (its source marks both "TODO since CDX1.5"): those two objects
are added to the JSON it writes, and the tests validate the whole document against the
CycloneDX 1.6 JSON schema. The library is imported here only (the ``sign`` extra); a
device reads a BOM from a verified bundle without it.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any

from insitu.audit import Entry, Ledger, events
from insitu.bundle._card import ModelCard
from insitu.errors import MissingDependencyError

__all__ = [
    "RUNTIME_PACKAGES",
    "build_bom",
    "ledger_figures",
    "require_sign_extra",
    "sign_extra_missing",
]

#: The packages insitu's runtime loads to verify, decrypt and run a bundle.
RUNTIME_PACKAGES = ("onnxruntime", "numpy", "onnx", "cryptography", "insitu")
_MODEL_REF = "model"
_DATA_REF = "dataset"


def sign_extra_missing(exc: ModuleNotFoundError) -> MissingDependencyError:
    """The one line for a publisher without the ``sign`` extra."""
    return MissingDependencyError(
        f"creating a bundle needs {(exc.name or 'model_signing').partition('.')[0]} (its "
        "ML-BOM and OpenSSF model signature), which this install lacks; install the extra "
        "that brings it: pip install 'insitu[sign]'"
    )


def require_sign_extra() -> None:
    """Raise :class:`MissingDependencyError` unless the ``sign`` extra is installed.

    pyOpenSSL is checked too: model-signing 1.1.1 imports it without declaring it.
    """
    try:
        import cyclonedx.output.json  # noqa: F401
        import model_signing.signing  # noqa: F401
        import OpenSSL  # noqa: F401
    except ModuleNotFoundError as exc:
        raise sign_extra_missing(exc) from exc


def _ref(entry: Entry) -> dict[str, Any]:
    return {"seq": entry.seq, "hash": entry.hash.hex()}


def _latest(ledger: Ledger, event: events.Event, keep: Any) -> Entry | None:
    for entry in ledger.entries(event_type=event.name, newest_first=True):
        if entry.type == event.name and keep(entry.payload):
            return entry
    return None


def ledger_figures(ledger: Ledger, card: ModelCard, model_sha256: str) -> dict[str, Any]:
    """The ledger's figures about this model and its run (``None`` where it has none).

    The membership audit is the latest of this exact model (by ONNX digest), else of its
    run; the one-run audit and the data set are those of the card's run.
    """
    run = card.provenance.get("run")
    figures: dict[str, Any] = {"run": run}
    completed = _latest(
        ledger, events.FEDERATION_COMPLETED, lambda p: run is not None and p.get("run") == run
    )
    accuracy = completed.payload.get("central_accuracy") if completed else None
    figures["central_accuracy"] = (
        {"value": float(accuracy), "entry": _ref(completed)}
        if completed is not None and accuracy is not None
        else None
    )
    audit = _latest(
        ledger, events.PRIVACY_AUDIT, lambda p: p.get("onnx_sha256") == model_sha256
    ) or _latest(ledger, events.PRIVACY_AUDIT, lambda p: run is not None and p.get("run") == run)
    attacks = audit.payload.get("attacks") if audit is not None else None
    if audit is not None and isinstance(attacks, list) and attacks:
        best = max(attacks, key=lambda a: float(a.get("auc", 0.0)))
        figures["membership"] = {
            "attack": str(best.get("attack")),
            "auc": float(best["auc"]),
            "auc_ci": [float(x) for x in best.get("auc_ci", [])],
            "violation": bool(audit.payload.get("violation")),
            "same_model": audit.payload.get("onnx_sha256") == model_sha256,
            "entry": _ref(audit),
        }
    else:
        figures["membership"] = None
    one_run = _latest(
        ledger, events.PRIVACY_ONE_RUN_AUDIT, lambda p: run is not None and p.get("run") == run
    )
    figures["one_run"] = (
        {
            "epsilon_lower_bound": float(one_run.payload["epsilon_lower_bound"]),
            "claimed_epsilon": float(one_run.payload["claimed_epsilon"]),
            "flagged": bool(one_run.payload["flagged"]),
            "entry": _ref(one_run),
        }
        if one_run is not None
        else None
    )
    started = _latest(
        ledger, events.FEDERATION_STARTED, lambda p: run is not None and p.get("run") == run
    )
    figures["dataset"] = (
        {
            "name": str(started.payload["dataset"]),
            "schema_sha256": str(started.payload["schema_sha256"]),
            "sites": len(started.payload.get("site_names", [])),
            "entry": _ref(started),
        }
        if started is not None
        else None
    )
    return figures


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _metric(kind: str, value: float, slice_: str, ci: list[float] | None = None) -> dict[str, Any]:
    metric: dict[str, Any] = {"type": kind, "value": repr(float(value)), "slice": slice_}
    if ci and len(ci) == 2:
        metric["confidenceInterval"] = {"lowerBound": repr(ci[0]), "upperBound": repr(ci[1])}
    return metric


def _entry_property(name: str, entry: dict[str, Any]) -> dict[str, str]:
    return {"name": f"insitu:ledger:{name}", "value": f"seq {entry['seq']} hash {entry['hash']}"}


def _quantitative(card: ModelCard, figures: dict[str, Any]) -> dict[str, Any]:
    metrics = [
        _metric(name, value, "as stated in the model card")
        for name, value in sorted(card.metrics.items())
    ]
    if figures.get("central_accuracy"):
        metrics.append(
            _metric(
                "accuracy",
                figures["central_accuracy"]["value"],
                "central evaluation recorded at the end of the federated run",
            )
        )
    if card.privacy is not None:
        metrics.append(
            _metric("epsilon", card.privacy["epsilon"], "differential privacy, per record")
        )
        metrics.append(_metric("delta", card.privacy["delta"], "differential privacy, per record"))
    membership = figures.get("membership")
    if membership:
        metrics.append(
            _metric(
                "membership-inference-auc",
                membership["auc"],
                f"{membership['attack']} attack on "
                + ("this model" if membership["same_model"] else "the model of its run"),
                membership["auc_ci"],
            )
        )
    if figures.get("one_run"):
        metrics.append(
            _metric(
                "epsilon-lower-bound-one-run-audit",
                figures["one_run"]["epsilon_lower_bound"],
                "one-run white-box audit with canaries of the run's mechanism",
            )
        )
    return {"performanceMetrics": metrics}


def _considerations(card: ModelCard, figures: dict[str, Any]) -> dict[str, Any]:
    privacy = card.privacy
    limits = [
        "The model answers for records shaped like its input schema; it was not evaluated "
        "outside the data set named in this BOM."
    ]
    ethical: list[dict[str, str]] = []
    if privacy is None:
        ethical.append(
            {
                "name": "trained without differential privacy: the model may reveal whether "
                "a person's record was in its training data",
                "mitigationStrategy": "ship it only to devices of the data controller",
            }
        )
    else:
        ethical.append(
            {
                "name": "membership inference against the persons whose records trained it",
                "mitigationStrategy": (
                    f"DP-SGD with (epsilon {privacy['epsilon']}, delta {privacy['delta']}) per "
                    f"record ({privacy.get('accountant', 'pld')} accountant); records never "
                    "left their sites"
                ),
            }
        )
    membership = figures.get("membership")
    if membership and membership["violation"]:
        limits.append("The membership audit found an attack beyond the DP bound.")
    one_run = figures.get("one_run")
    if one_run and one_run["flagged"]:
        limits.append("The one-run audit's lower bound exceeds the claimed epsilon.")
    return {"technicalLimitations": limits, "ethicalConsiderations": ethical}


def _model_card(card: ModelCard, figures: dict[str, Any]) -> dict[str, Any]:
    def formats(values: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"format": f"{v['name']}: {v['type']} {v['shape']}"} for v in values]

    return {
        "bom-ref": "model-card",
        "modelParameters": {
            "approach": {"type": "supervised"},
            "task": "classification",
            "architectureFamily": "neural network (ONNX)",
            "datasets": [{"ref": _DATA_REF}],
            "inputs": formats(card.inputs),
            "outputs": formats(card.outputs),
        },
        "quantitativeAnalysis": _quantitative(card, figures),
        "considerations": _considerations(card, figures),
    }


def _dataset(card: ModelCard, figures: dict[str, Any]) -> dict[str, Any]:
    dataset = figures.get("dataset") or {}
    schema = card.provenance.get("data_schema_sha256") or dataset.get("schema_sha256")
    properties = [{"name": "insitu:data_schema_sha256", "value": str(schema or "not stated")}]
    if dataset:
        properties.append({"name": "insitu:sites", "value": str(dataset["sites"])})
    return {
        "type": "dataset",
        "name": str(dataset.get("name", "training data")),
        "contents": {"properties": properties},
        "sensitiveData": ["records of persons, held at their sites; none is in this BOM"],
        "description": "Described by its schema digest only: no record left its site.",
    }


def _properties(figures: dict[str, Any], card: ModelCard) -> list[dict[str, str]]:
    properties = [{"name": "insitu:run", "value": str(figures.get("run") or "none")}]
    entry = card.provenance.get("run_entry")
    if isinstance(entry, dict):
        properties.append(_entry_property("federation.completed", entry))
    for key, event in (
        ("membership", events.PRIVACY_AUDIT.name),
        ("one_run", events.PRIVACY_ONE_RUN_AUDIT.name),
        ("dataset", events.FEDERATION_STARTED.name),
    ):
        if figures.get(key):
            properties.append(_entry_property(event, figures[key]["entry"]))
    return properties


def build_bom(
    card: ModelCard, model: bytes | bytearray, figures: dict[str, Any], *, publisher: str
) -> dict[str, Any]:
    """The CycloneDX 1.6 ML-BOM of ``model`` (as a JSON object).

    Raises:
        MissingDependencyError: cyclonedx-python-lib is not installed (``sign`` extra).

    """
    try:
        from cyclonedx.model import HashAlgorithm, HashType, Property
        from cyclonedx.model.bom import Bom
        from cyclonedx.model.component import Component, ComponentType
        from cyclonedx.output.json import JsonV1Dot6
        from packageurl import PackageURL
    except ModuleNotFoundError as exc:
        raise sign_extra_missing(exc) from exc

    model_component = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=card.name,
        version=card.version,
        bom_ref=_MODEL_REF,
        description=card.description or None,
        publisher=publisher,
        hashes=[
            HashType(alg=HashAlgorithm.SHA_256, content=hashlib.sha256(model).hexdigest()),
            HashType(alg=HashAlgorithm.SHA_512, content=hashlib.sha512(model).hexdigest()),
        ],
        properties=[Property(name=p["name"], value=p["value"]) for p in _properties(figures, card)],
    )
    data_component = Component(
        type=ComponentType.DATA, name=_dataset(card, figures)["name"], bom_ref=_DATA_REF
    )
    libraries = [
        Component(
            type=ComponentType.LIBRARY,
            name=name,
            version=version,
            bom_ref=f"pkg:{name}",
            purl=PackageURL(type="pypi", name=name, version=version),
        )
        for name in RUNTIME_PACKAGES
        if (version := _version(name)) is not None
    ]
    bom = Bom()
    bom.metadata.component = model_component
    bom.components.add(data_component)
    for library in libraries:
        bom.components.add(library)
    bom.register_dependency(model_component, [data_component, *libraries])
    doc: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    # What the library cannot model yet (see the module docstring).
    doc["metadata"]["component"]["modelCard"] = _model_card(card, figures)
    for component in doc.get("components", []):
        if component.get("bom-ref") == _DATA_REF:
            component["data"] = [_dataset(card, figures)]
    return doc
