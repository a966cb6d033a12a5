"""Keys in the evidence: where each node's keys live, and which nodes attested.

Issue 19 asks the report's security part to say, from the ledgers, where each node's
signing key and decryption key live (a file, a PKCS#11 token, a TPM 2.0) and which sites
and devices proved their measured state. Both come from ledger entries only:

* ``workspace.init`` (``signing_key_store``, ``signing_key_uri``, ``signing_algorithm``,
  ``decryption_key_store``, ``decryption_key_uri``, ``decryption_algorithm``; a ledger
  older than these fields was made with file keys, and the row says it is inferred),
  then every ``workspace.keys_migrated`` (``keys``, ``store``, ``uris``,
  ``algorithms``, ``replaced``) in order;
* ``attestation.checked`` in any ledger the report reads (the coordinator's, as verifier
  of its sites; a publisher's, of its devices): subject, kind, decision, the PCRs quoted
  and, for a refusal, the PCR that differed.

A key in a token is a TPM when the URI says so: its ``module-path`` is tpm2-pkcs11's
library, or its ``manufacturer``/``model`` names a TPM. A PIN never reaches a ledger
(``insitu init`` refuses one in a URI); one is stripped here all the same.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote

from insitu.audit import Entry
from insitu.report._evidence import Evidence, LedgerEvidence
from insitu.report._evidence import entry_ref as _ref

__all__ = ["attestation_section", "key_section", "keys_and_attestation"]

#: ``decision`` values of ``attestation.checked`` that admit the subject.
_ADMITTED = {"admitted", "accepted", "ok", "passed", "trusted", "allowed"}
_DEFAULTS = {"signing": ("file", "ed25519"), "decryption": ("file", "x25519")}
_FILES = {"signing": "keys/signing.key", "decryption": "keys/encryption.key"}


def _uri_parts(uri: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URI without a PIN, its path attributes and its query."""
    body = uri[len("pkcs11:") :] if uri.startswith("pkcs11:") else uri
    path, _, query = body.partition("?")
    attributes = {}
    for part in filter(None, path.split(";")):
        name, _, value = part.partition("=")
        attributes[name] = unquote(value)
    queries = {k: v for k, v in parse_qsl(query) if k not in ("pin-value", "pin-source")}
    query = "&".join(f"{k}={v}" for k, v in queries.items())
    shown = f"pkcs11:{path}" + (f"?{query}" if query else "")
    return shown, attributes, queries


def _where(store: str, uri: str | None) -> str:
    """In words: ``file``, ``PKCS#11 token`` or ``TPM 2.0 (tpm2-pkcs11)``."""
    if store == "file" or not uri:
        return "file" if store == "file" else f"{store} (no URI recorded)"
    if store == "tpm":
        return "TPM 2.0"
    _, attributes, queries = _uri_parts(uri)
    module = queries.get("module-path", "").lower()
    named = " ".join(attributes.get(k, "") for k in ("manufacturer", "model")).lower()
    if "tpm2" in module or "tpm" in named.split():
        return "TPM 2.0 (tpm2-pkcs11)"
    return "PKCS#11 token"


def _key_row(
    le: LedgerEvidence, kind: str, init: Entry | None, migrations: list[Entry]
) -> dict[str, Any]:
    store, algorithm = _DEFAULTS[kind]
    payload = init.payload if init else {}
    recorded = f"{kind}_key_store" in payload
    store = str(payload.get(f"{kind}_key_store", store))
    uri = payload.get(f"{kind}_key_uri")
    algorithm = str(payload.get(f"{kind}_algorithm", algorithm))
    sources = [_ref(le, [init])] if init else []
    moved: list[Entry] = []
    for entry in migrations:
        if kind not in entry.payload.get("keys", []):
            continue
        moved.append(entry)
        store = str(entry.payload.get("store", store))
        uri = (entry.payload.get("uris") or {}).get(kind, uri)
        algorithm = str((entry.payload.get("algorithms") or {}).get(kind, algorithm))
        sources.append(_ref(le, [entry]))
    shown = _uri_parts(str(uri))[0] if uri and store != "file" else None
    return {
        "key": kind,
        "store": store,
        "where": _where(store, None if uri is None else str(uri)),
        "uri": shown,
        "file": _FILES[kind] if store == "file" else None,
        "algorithm": algorithm,
        "migrated": bool(moved),
        "migrated_time": moved[-1].time if moved else None,
        # Made anew in the token (the decryption key) rather than the file key moved.
        "replaced": any(kind in e.payload.get("replaced", []) for e in moved),
        # A ledger older than the fields: its keys were files (no token existed then).
        "inferred": not recorded and not moved,
        "sources": sources,
    }


def key_section(evidence: Evidence) -> list[dict[str, Any]]:
    """Per ledger the report reads: where its signing and decryption keys live."""
    nodes = []
    for le in evidence.ledgers:
        init = next(iter(le.of_type("workspace.init")), None)
        migrations = le.of_type("workspace.keys_migrated")
        nodes.append(
            {
                "name": le.name,
                "role": le.role,
                "node_id": le.node_id,
                "verified": le.verified,
                "keys": [
                    _key_row(le, kind, init, migrations) for kind in ("signing", "decryption")
                ],
            }
        )
    return nodes


def _check_row(le: LedgerEvidence, entry: Entry) -> dict[str, Any]:
    p = entry.payload
    admitted = str(p.get("decision", "")).lower() in _ADMITTED
    return {
        "subject": str(p.get("subject", "")),
        "kind": str(p.get("kind", "")),
        "decision": str(p.get("decision", "")),
        "admitted": admitted,
        "pcrs": list(p.get("pcrs", [])),
        "pcr": p.get("pcr"),
        "reason": p.get("reason"),
        "measurement": p.get("measurement"),
        "ak_fingerprint": p.get("ak_fingerprint"),
        "run": p.get("run"),
        "verifier": le.name,
        "time": entry.time,
        "source": _ref(le, [entry]),
    }


def attestation_section(evidence: Evidence, run: str | None) -> dict[str, Any]:
    """Every ``attestation.checked`` of the run (or of no run) in the ledgers read.

    ``admitted`` and ``refused`` name each subject once, by its latest check; a site of
    the report that no ledger shows attesting is listed under ``not_attested``.
    """
    checks = [
        _check_row(le, e)
        for le in evidence.ledgers
        for e in le.of_type("attestation.checked")
        if e.payload.get("run") in (None, run)
    ]
    latest: dict[str, dict[str, Any]] = {}
    for check in sorted(checks, key=lambda c: str(c["time"])):
        latest[check["subject"]] = check
    seen = set(latest)
    not_attested = [
        le.name
        for le in evidence.ledgers
        if le.role != "coordinator" and le.name not in seen and le.node_id not in seen
    ]
    return {
        "checks": checks,
        "admitted": sorted(s for s, c in latest.items() if c["admitted"]),
        "refused": sorted(s for s, c in latest.items() if not c["admitted"]),
        "not_attested": not_attested,
    }


def keys_and_attestation(evidence: Evidence, run: str | None) -> dict[str, Any]:
    """The data of the report's "Keys and attestation" part (section 2)."""
    return {"nodes": key_section(evidence), "attestation": attestation_section(evidence, run)}
