"""The artefacts a ledger links to one run: its bundles, installs, fine-tunes, optimization.

Each is found by what its entry names, never by being the latest of its kind:

* a bundle by the ``run`` its ``bundle.created`` entry names (the run behind the model,
  followed through ``model.optimized`` by ``insitu.bundle``'s provenance);
* an install, a rollback, a repair or a download at a site or device by the model and
  version of one of those bundles (or the SHA-256 of its bytes);
* a device's fine-tune (``finetune.installed`` / ``finetune.rejected``) by the model and
  base version it started from, when that version is one of the run's bundles;
* an optimization (``insitu optimize``, standalone or in the quickstart) by the ``run``
  its ``model.optimized`` entry names.
"""

from __future__ import annotations

from typing import Any

from insitu.audit import Entry
from insitu.report._evidence import Evidence, LedgerEvidence
from insitu.report._evidence import entry_ref as _ref

__all__ = ["finetunes", "models", "optimization"]

_HISTORY_KEYS = {"version", "kind", "target", "previous", "slot", "reason"}


def _about(entry: Entry, versions: set[tuple[str, str]], digests: set[str]) -> bool:
    """Whether an ``update.*`` entry is about one of the run's bundles."""
    p = entry.payload
    model = str(p.get("model"))
    if p.get("bundle_sha256") in digests:
        return True
    if any((model, str(p.get(k))) in versions for k in ("version", "from_version")):
        return True
    target = str(p.get("target") or "")
    return any(m == model and v in target for m, v in versions)


def models(coord: LedgerEvidence, devices: list[LedgerEvidence], run: str) -> dict[str, Any]:
    """The run's bundles, where each was installed, and the update history about them."""
    created = [e for e in coord.of_type("bundle.created") if e.payload.get("run") == run]
    published = {e.payload.get("bundle_sha256"): e for e in coord.of_type("repo.published")}
    digests = {str(e.payload.get("bundle_sha256")) for e in created}
    versions = {(str(e.payload.get("model")), str(e.payload.get("version"))) for e in created}
    out = []
    for entry in created:
        p = entry.payload
        digest = p.get("bundle_sha256")
        installs = [
            {"site": d.name, "time": e.time, "slot": e.payload["slot"]}
            for d in devices
            for e in d.of_type("update.installed")
            if e.payload.get("bundle_sha256") == digest
        ]
        out.append(
            {
                "model": p.get("model"),
                "version": p.get("version"),
                "time": entry.time,
                "bundle_id": p.get("bundle_id"),
                "bundle_sha256": digest,
                "encrypted": p.get("encrypted"),
                "recipients": p.get("recipients"),
                "epsilon": p.get("epsilon"),
                "signer": coord.node_id,
                "published": digest in published,
                "targets_version": published[digest].payload.get("targets_version")
                if digest in published
                else None,
                "installs": installs,
            }
        )
    history = []
    for device in devices:
        for e in device.of_type("update."):
            if not _about(e, versions, digests):
                continue
            detail = ", ".join(
                f"{k} {v}" for k, v in e.payload.items() if k in _HISTORY_KEYS and v is not None
            )
            history.append(
                {
                    "site": device.name,
                    "time": e.time,
                    "event": e.type.split(".", 1)[1],
                    "detail": detail,
                }
            )
    history.sort(key=lambda h: h["time"])
    return {
        "versions": out,
        "history": history,
        "finetunes": finetunes(devices, versions),
        "sources": [_ref(coord, created)]
        + [
            _ref(d, [e for e in d.of_type("update.") if _about(e, versions, digests)])
            for d in devices
        ],
    }


def finetunes(
    devices: list[LedgerEvidence], versions: set[tuple[str, str]]
) -> list[dict[str, Any]]:
    """Each device's fine-tune of one of the run's bundles: figures, installed or not."""
    rows = []
    for device in devices:
        for e in device.of_type("finetune."):
            p = e.payload
            if e.type == "finetune.trained":
                continue
            if (str(p.get("model")), str(p.get("base_version"))) not in versions:
                continue
            rows.append(
                {
                    "site": device.name,
                    "time": e.time,
                    "model": p.get("model"),
                    "base_version": p.get("base_version"),
                    "installed": e.type == "finetune.installed",
                    "version": p.get("version"),
                    "reason": p.get("reason"),
                    "accuracy_installed": p.get("accuracy_installed"),
                    "accuracy_finetuned": p.get("accuracy_finetuned"),
                    "rows_train": p.get("rows_train"),
                    "rows_holdout": p.get("rows_holdout"),
                    "epsilon": p.get("epsilon"),
                    "epsilon_spent_total": p.get("epsilon_spent_total"),
                    "source": f"{device.name} #{e.seq} {e.type}",
                }
            )
    return rows


def optimization(
    evidence: Evidence, coord: LedgerEvidence, run: str, onnx_sha256: str | None
) -> dict[str, Any] | None:
    """The run's latest ``model.optimized``, in the form of the quickstart's optimize step.

    The size before is the run's verified ONNX model when the optimization started from
    it, else the fp32 candidate (the source exported as it is).
    """
    entries = [e for e in coord.of_type("model.optimized") if e.payload.get("run") == run]
    if not entries:
        return None
    entry = entries[-1]
    p = entry.payload
    found: dict[str, Any] = p.get("candidates") or {}
    chosen = p.get("chosen")
    onnx = evidence.artefact(f"onnx:{run}")
    source = p.get("source_onnx_sha256") or p.get("source_sha256")
    before = (
        len(onnx)
        if isinstance(onnx, bytes) and onnx_sha256 is not None and source == onnx_sha256
        else found.get("fp32", {}).get("size_bytes")
    )
    pick = found.get(chosen, {}) if chosen else {}
    candidates = [
        {
            "name": name,
            "bytes": c.get("size_bytes") if c.get("built") else None,
            "p50_ms": c.get("latency_p50_ms"),
            "accuracy": c.get("accuracy"),
            "error": None if c.get("built") else "not built",
        }
        for name, c in found.items()
    ]
    after = pick.get("size_bytes")
    summary = (
        f"{chosen}: {after:,} bytes, p50 {float(pick.get('latency_p50_ms') or 0):.4f} ms, "
        f"chosen among {len(found)} candidate(s) (insitu optimize)"
        if chosen and after is not None
        else f"none of the {len(found)} candidate(s) met the constraints (insitu optimize)"
    )
    return {
        "step": "optimize",
        "status": "ok" if chosen else "no choice",
        "summary": summary,
        "seq": entry.seq,
        "from": f"{coord.name} #{entry.seq} model.optimized",
        "figures": {
            "model_bytes_before": before,
            "model_bytes_after": after,
            "p50_ms": pick.get("latency_p50_ms"),
            "chosen": chosen,
            "candidates": candidates,
        },
    }
