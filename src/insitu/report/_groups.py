"""The report's section "Performance per group of persons" (AI Act Annex IV 3, Art. 10).

Read from the coordinator's ``evaluation.groups`` entry of the run (written by
``insitu.federated``): for each sensitive attribute the schema declared and each of its
values, the sums over the sites of their noisy counts of true and false positives and
negatives on their held-out subjects. From them, and nothing else:

* the group's size ``n`` (the sum of its four cells) and its accuracy
  ``(TP + TN) / n``, false positive rate ``FP / (FP + TN)`` and false negative rate
  ``FN / (FN + TP)``, each from cells clipped at 0 (post-processing of the noisy sums);
* a group whose noisy size is below the schema's ``min_size`` is *suppressed*: no figure
  of it is shown, only that it was suppressed; so is a rate whose denominator is;
* 95% intervals: the Wilson score interval of the ratio (the sampling error of a
  proportion over ``n`` subjects), widened in quadrature by the DP noise, whose standard
  deviation is carried through the ratio by the delta method: for ``p = a / (a + b)``
  with independent noise variances ``va`` and ``vb`` on ``a`` and ``b``,
  ``sd = sqrt((1 - p)^2 va + p^2 vb) / (a + b)``; each cell sum carries
  ``sites * noise_std^2``. Clipped to [0, 1];
* the largest gap in accuracy between two reported groups of an attribute, with the
  interval of the difference (the two groups' errors in quadrature), flagged when it is
  beyond the schema's ``max_gap``.
"""

from __future__ import annotations

import math
from typing import Any

from insitu.audit import Entry
from insitu.report._evidence import LedgerEvidence

__all__ = ["annex_text", "group_section"]

#: The two-sided 95% normal quantile.
Z95 = 1.959963984540054
#: The group of values outside an attribute's declared categories (``insitu.federated``).
_OTHER = "(other)"


def _ref(le: LedgerEvidence, entry: Entry) -> str:
    return f"{le.name} #{entry.seq} {entry.type}"


def _rate(a: float, b: float, va: float, vb: float, min_size: int) -> dict[str, Any] | None:
    """``a / (a + b)`` with its 95% interval (see the module docstring); None if suppressed."""
    n = a + b
    if n < min_size or n <= 0:
        return None
    p = a / n
    z2 = Z95 * Z95
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    wilson = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    noise_sd = math.sqrt((1 - p) ** 2 * va + p * p * vb) / n
    half = math.hypot(wilson, Z95 * noise_sd)
    return {
        "value": p,
        "low": max(0.0, center - half),
        "high": min(1.0, center + half),
        "se": half / Z95,
    }


def _text(rate: dict[str, Any] | None) -> str:
    if rate is None:
        return "suppressed"
    return f"{100 * rate['value']:.1f}% ({100 * rate['low']:.1f}-{100 * rate['high']:.1f})"


def _row(value: str, cells: dict[str, float], var: float, min_size: int) -> dict[str, Any]:
    """One group: its noisy size and, unless suppressed, its rates and their intervals."""
    tp, fp, tn, fn = (max(0.0, float(cells.get(c, 0.0))) for c in ("tp", "fp", "tn", "fn"))
    count = sum(float(cells.get(c, 0.0)) for c in ("tp", "fp", "tn", "fn"))
    suppressed = count < min_size
    accuracy = None if suppressed else _rate(tp + tn, fp + fn, 2 * var, 2 * var, min_size)
    fpr = None if suppressed else _rate(fp, tn, var, var, min_size)
    fnr = None if suppressed else _rate(fn, tp, var, var, min_size)
    return {
        "value": value,
        "label": "values outside the declared categories" if value == _OTHER else value,
        "count": max(0, round(count)),
        "suppressed": suppressed or accuracy is None,
        "accuracy": accuracy,
        "fpr": fpr,
        "fnr": fnr,
        "accuracy_text": _text(accuracy),
        "fpr_text": _text(fpr),
        "fnr_text": _text(fnr),
    }


def _gap(rows: list[dict[str, Any]], max_gap: float) -> dict[str, Any] | None:
    """The largest accuracy gap between two reported groups, its interval, and the flag."""
    shown = [r for r in rows if r["accuracy"] is not None]
    if len(shown) < 2:
        return None
    low = min(shown, key=lambda r: r["accuracy"]["value"])
    high = max(shown, key=lambda r: r["accuracy"]["value"])
    gap = high["accuracy"]["value"] - low["accuracy"]["value"]
    half = Z95 * math.hypot(high["accuracy"]["se"], low["accuracy"]["se"])
    return {
        "value": gap,
        "low": gap - half,
        "high": gap + half,
        "between": [high["label"], low["label"]],
        "flagged": gap > max_gap,
        # Beyond the threshold even at the low end of its interval.
        "decisive": gap - half > max_gap,
        "text": f"{100 * gap:.1f} points ({100 * (gap - half):.1f} to {100 * (gap + half):.1f}) "
        f"between {high['label']} and {low['label']}",
    }


def group_section(coord: LedgerEvidence, run: str) -> dict[str, Any] | None:
    """The section's data for ``run``; None when no group performance was recorded."""
    entries = [e for e in coord.of_type("evaluation.groups") if e.payload.get("run") == run]
    if not entries:
        return None
    entry = entries[-1]
    p = entry.payload
    completed = [e for e in coord.of_type("federation.completed") if e.payload.get("run") == run]
    kept = completed[-1].payload.get("kept_round") if completed else None
    sites = list(p.get("sites", []))
    var = len(sites) * float(p.get("noise_std", 0.0)) ** 2
    min_size, max_gap = int(p.get("min_size", 1)), float(p.get("max_gap", 1.0))
    attributes = []
    for name in p.get("attributes", []):
        values = dict(p.get("groups", {}).get(name, {}))
        rows = [_row(str(v), dict(cells), var, min_size) for v, cells in values.items()]
        # Values outside the vocabulary are shown only when they form a reportable group.
        rows = [r for r in rows if r["value"] != _OTHER or not r["suppressed"]]
        attributes.append(
            {
                "name": name,
                "rows": rows,
                "suppressed": sum(r["suppressed"] for r in rows),
                "gap": _gap(rows, max_gap),
            }
        )
    return {
        "measured": bool(sites),
        "privacy": p.get("privacy"),
        "round": p.get("round"),
        # The run kept an earlier round's model: these figures are of another model.
        "kept_round": kept if kept is not None and kept != p.get("round") else None,
        "sites": sites,
        "sites_missing": list(p.get("sites_missing", [])),
        "noise_std": float(p.get("noise_std", 0.0)),
        "epsilon": p.get("epsilon"),
        "delta": p.get("delta"),
        "min_size": min_size,
        "max_gap": max_gap,
        "attributes": attributes,
        "flagged": [a["name"] for a in attributes if a["gap"] and a["gap"]["flagged"]],
        "sources": [_ref(coord, entry)],
    }


def annex_text(section: dict[str, Any] | None) -> str:
    """Annex IV item 3's statement on performance per group of persons."""
    if section is None:
        return (
            "accuracy per group of persons is not measured (the data schema declares no "
            "sensitive attribute: [groups] sensitive)"
        )
    if not section["measured"]:
        why = (
            "site-level privacy releases no site evaluation"
            if section["privacy"] == "site"
            else "no site released its group counts"
        )
        return f"accuracy per group of persons is not measured ({why})"
    parts = []
    for attribute in section["attributes"]:
        shown = [r for r in attribute["rows"] if not r["suppressed"]]
        groups = ", ".join(f"{r['label']} {r['accuracy_text']}" for r in shown)
        text = f"{attribute['name']}: {groups or 'every group suppressed'}"
        if attribute["suppressed"]:
            text += (
                f"; {attribute['suppressed']} group(s) suppressed (fewer than "
                f"{section['min_size']} subjects)"
            )
        gap = attribute["gap"]
        if gap is not None:
            flag = "FLAGGED: beyond" if gap["flagged"] else "within"
            text += (
                f"; largest gap {100 * gap['value']:.1f} points, {flag} the threshold of "
                f"{100 * section['max_gap']:.1f}"
            )
        parts.append(text)
    return "accuracy per group of persons (95% intervals, DP noise included): " + "; ".join(parts)
