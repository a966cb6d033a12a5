"""Rendering: the sections into one self-contained HTML page, and that page into a PDF.

The HTML has no external reference (styles inline, plots as inline SVG), so it reads
offline and can be archived as one file. The PDF is the same page printed by a local
headless Chromium (``chromium --headless --print-to-pdf``; Debian's package, found on
``PATH`` or at ``/usr/bin/chromium``): nothing is downloaded, the page loads nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import insitu
from insitu._atomic import atomic_write_bytes, atomic_write_text, refuse_symlink
from insitu.errors import ReportError, UnverifiedEvidenceError, UsageError
from insitu.report import _plots
from insitu.report._evidence import Evidence, collect_evidence
from insitu.report._groups import annex_text
from insitu.report._sections import build_sections

__all__ = ["Report", "build_report", "render_html", "render_pdf", "write_report"]

FORMATS = ("html", "pdf")


@dataclass
class Report:
    """A report's evidence, sections, summary and plots: everything the page shows."""

    evidence: Evidence
    sections: dict[str, Any]
    summary: dict[str, Any]
    plots: dict[str, str | None] = field(repr=False)
    command: str = "insitu report DIR --out report.html"

    def to_json(self) -> dict[str, Any]:
        """The headline figures and the verification outcome."""
        return {
            "verified": self.evidence.verified,
            "problems": self.evidence.problems,
            "run": self.sections["run"],
            "status": self.sections["status"]["state"],
            "ledgers": [
                {
                    "name": le.name,
                    "role": le.role,
                    "entries": len(le.entries),
                    "verified": le.verified,
                }
                for le in self.evidence.ledgers
            ],
            "artefacts": [
                {"what": a.what, "path": a.path, "ok": a.ok} for a in self.evidence.artefacts
            ],
            "summary": {k: v for k, v in self.summary.items() if k != "rows"},
            # Where each node's keys live and who attested (insitu.report._keys).
            "keys": self.sections.get("keys"),
        }


def _flows_total(flows: list[dict[str, Any]]) -> dict[str, Any]:
    recorded = [f for f in flows if f["recorded"]]
    raw = sum(int(f["raw_record_bytes"] or 0) for f in recorded) if recorded else None
    return {
        "model_updates": sum(f["model_updates"] for f in recorded),
        "bytes_out": sum(f["bytes_out"] for f in recorded),
        "raw_record_bytes": raw,
        "raw_records_text": "not measured (no egress recorded)"
        if raw is None
        else ("none (0 bytes)" if raw == 0 else f"{raw:,} unclassified bytes"),
    }


def _summary(evidence: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    config = s["training"]["config"]
    eps = [p["epsilon_run"] for p in s["privacy"] if p["epsilon_run"] is not None]
    audit = s["audit"]
    attack = audit["attacks"][0] if audit and audit["attacks"] else None
    flows = _flows_total(s["flows"])
    optimize = s["steps"].get("optimize", {})
    serve = s["steps"].get("serve", {})
    opt = optimize.get("figures", {}) if optimize.get("status") == "ok" else {}
    opt_from = "model.optimized" if "from" in optimize else "quickstart.step optimize"
    srv = serve.get("figures", {}) if serve.get("status") == "ok" else {}
    baseline = s["baseline"] or {}
    private = baseline.get("private_accuracy", s["training"]["central_accuracy"])
    p50 = srv.get("p50_ms", opt.get("p50_ms"))
    verified = sum(le.verified for le in evidence.ledgers)
    summary = {
        "private_accuracy": private,
        "baseline_accuracy": baseline.get("baseline_accuracy"),
        "epsilon_max": max(eps) if eps else None,
        "epsilon_by_site": {p["site"]: p["epsilon_run"] for p in s["privacy"]},
        "epsilon_target": config.get("epsilon"),
        "delta": config.get("delta"),
        "attack_auc": attack["auc"] if attack else None,
        "violation": bool(audit and audit["violation"]),
        "raw_bytes": flows["raw_record_bytes"],
        "bytes_out": flows["bytes_out"],
        "model_bytes_before": opt.get("model_bytes_before"),
        "model_bytes_after": opt.get("model_bytes_after"),
        "p50_ms": p50,
        "ledgers_verified": verified,
        "ledgers": len(evidence.ledgers),
    }

    def pct(value: Any) -> str | None:
        return None if value is None else f"{100 * float(value):.2f}%"

    eps_text = ", ".join(
        f"{k} {v:.3f}" for k, v in summary["epsilon_by_site"].items() if v is not None
    )
    raw = flows["raw_record_bytes"]
    totals = [p["epsilon_total"] for p in s["privacy"] if p["epsilon_total"] is not None]
    total = max(totals) if totals else None
    o = s.get("one_run_audit")
    one_run = (
        None
        if not o
        else f"{o['epsilon_lower_bound']:.3f} vs {o['claimed_epsilon']:.3f}"
        + (" (FLAGGED)" if o.get("flagged") else "")
    )
    sizes = (
        f"{opt.get('model_bytes_before') or 0:,} / {opt.get('model_bytes_after') or 0:,} bytes"
        if opt
        else (optimize.get("summary") if optimize else None)
    )
    summary["rows"] = [
        ("accuracy, federated with DP (sites' held-out records)", pct(private),
         "federation.baseline"),
        ("accuracy, non-private centralized baseline", pct(baseline.get("baseline_accuracy")),
         "federation.baseline"),
        ("epsilon of this run, per site", eps_text or None, "each site's privacy.spent"),
        ("epsilon spent so far, most at any site", None if total is None else f"{total:.3f}",
         "each site's privacy.spent"),
        ("one-run audit: empirical lower bound vs claimed epsilon", one_run,
         "privacy.one_run_audit"),
        ("membership attack AUC (loss attack)", None if attack is None else f"{attack['auc']:.4f}",
         "privacy.audit"),
        ("raw-data bytes that crossed a site boundary", None if raw is None else f"{raw:,}",
         "each site's federation.egress"),
        ("model size before / after optimization", sizes, opt_from),
        ("p50 latency", None if p50 is None else f"{float(p50):.2f} ms",
         "quickstart.step serve/optimize"),
        ("ledgers verified", f"{verified} of {len(evidence.ledgers)}", "insitu audit verify"),
    ]  # fmt: skip
    if not s["status"]["completed"]:
        _headline_nothing(summary)
    return summary


def _headline_nothing(summary: dict[str, Any]) -> None:
    """A run without a model headlines no figure of one: no accuracy, epsilon or attack.

    What crossed the sites' boundaries and whether the ledgers verified still hold (and
    each site's spending stays in the privacy section: the run did cost it).
    """
    for key in (
        "private_accuracy", "baseline_accuracy", "epsilon_max", "attack_auc",
        "model_bytes_before", "model_bytes_after", "p50_ms",
    ):  # fmt: skip
        summary[key] = None
    summary["epsilon_by_site"] = {}
    keep = ("raw-data bytes", "ledgers verified")
    summary["rows"] = [row for row in summary["rows"] if row[0].startswith(keep)]


def _measures(s: dict[str, Any]) -> list[str]:
    c = s["training"]["config"]
    schema = s["schema"]
    out = []
    if schema is not None:
        out.append(
            "data minimization: only the schema's declared features reach a model; "
            f"dropped: {', '.join(schema.drop) or 'none'}"
        )
        out.append(
            f"pseudonymization of {', '.join(schema.pseudonymize) or 'no column'} with a key "
            "held by each site (never leaves it)"
        )
        if schema.consent_required:
            withdrawn = [f["excluded_without_consent"] for f in s["flows"]]
            out.append(
                f"consent checked per record at every round (purpose '{schema.consent_purpose}'); "
                f"records left out in the last round: {sum(w or 0 for w in withdrawn):,}"
            )
    if c.get("privacy") != "none":
        out.append(
            f"{c.get('privacy')}-level differential privacy (DP-SGD, clipping norm "
            f"{c.get('max_grad_norm')}), epsilon {c.get('epsilon')} per run, delta "
            f"{c.get('delta')}; budgets enforced by each site"
        )
    if c.get("secure_aggregation"):
        out.append("secure aggregation (SecAgg+): the coordinator sees only the sum of updates")
    out.append("prepared records sealed at rest with each site's key (AES-GCM)")
    if s["models"]["versions"]:
        out.append(
            "models shipped as Ed25519-signed bundles encrypted for the sites' X25519 keys, "
            "through a TUF repository (rollback, freeze and mix-and-match refused)"
        )
    out.append(
        "append-only, hash-chained, signed audit ledger at every node, with Merkle tree heads"
    )
    if s["audit"]:
        out.append("empirical membership-inference audit of the trained model")
    return out


def _annex(s: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    c = s["training"]["config"]
    d = s["declared"] or {}
    versions = s["models"]["versions"]
    latest = versions[-1] if versions else None
    audit = (
        None
        if summary["attack_auc"] is None
        else f"membership inference (loss attack) AUC {summary['attack_auc']:.3f}, checked "
        "against the (epsilon, delta) bound"
    )
    accuracy = (
        None
        if summary["private_accuracy"] is None
        else f"accuracy {summary['private_accuracy']:.4f} on the sites' held-out records, after "
        "every round in signed, dated ledger entries"
    )
    version = (
        None
        if latest is None
        else f"{latest['model']} {latest['version']}, shipped as signed bundles through a TUF "
        "repository"
    )
    secagg = " under SecAgg+" if c.get("secure_aggregation") else ""
    design = (
        f"{c.get('model')} model; FedAvg{secagg}; DP-SGD ({c.get('privacy')}-level, epsilon "
        f"{c.get('epsilon')}): privacy traded for accuracy, see the baseline"
    )
    data = (
        f"data schema {str(c.get('schema_sha256', ''))[:16]}: declared features only, "
        "identifiers pseudonymized, consent per record; each site prepared and sealed its own "
        "records"
    )
    baseline = (
        None
        if summary["baseline_accuracy"] is None
        else f"non-private baseline {summary['baseline_accuracy']:.4f}"
    )
    limits = "; ".join(t for t in (baseline, annex_text(s.get("groups"))) if t)
    security = (
        "signed and encrypted bundles, TUF updates, signed hash-chained ledgers, SecAgg+, "
        "egress measured at every site"
    )
    method = (
        f"federated training over {c.get('sites')} sites, {c.get('rounds')} rounds, each site "
        "training on its own records"
    )
    changes = f"{len(versions)} model version(s) with install history" if versions else None
    return [
        ("1(a) intended purpose, provider, version", "; ".join(d.get("purposes", [])) or None,
         "sections 3, 8"),
        ("1(c) versions and update requirements", version, "section 8"),
        ("2(a) methods and steps of development", method, "section 6"),
        ("2(b) design: logic, algorithms, key choices", design, "sections 5, 6"),
        ("2(c) architecture, computational resources", None, ""),
        ("2(d) data: provenance, scope, selection, cleaning", data, "sections 3, 4"),
        ("2(e) human oversight measures (Art. 14)", None, ""),
        ("2(g) validation and testing; metrics", accuracy, "section 6"),
        ("2(g) robustness metrics (privacy attacks)", audit, "section 5"),
        ("2(h) cybersecurity measures", security, "sections 2, 4, 8"),
        ("3 capabilities and limitations in performance", limits, "section 6, per group"),
        ("5 risk management system (Art. 9)", None, ""),
        ("6 changes through the lifecycle", changes, "section 8"),
        ("9 post-market monitoring", None, ""),
    ]  # fmt: skip


def build_report(paths: list[Path], *, run: str | None = None) -> Report:
    """Collect and verify the evidence at ``paths`` and build every section from it.

    ``run``: the federated run to report on (default: the latest completed one).

    Raises:
        UsageError: a path without a workspace, an unknown ``run`` (the line names the
            runs there are), or no completed run when none is named.

    """
    evidence = collect_evidence(paths)
    s = build_sections(evidence, run)
    summary = _summary(evidence, s)
    c = s["training"]["config"]
    audit = s["audit"]
    optimize = s["steps"].get("optimize", {})
    plots = {
        "accuracy": _plots.accuracy_plot(s["training"]["rounds"], summary["baseline_accuracy"]),
        "epsilon": _plots.epsilon_plot(s["epsilon_by_round"], c.get("epsilon")),
        "flow": _plots.flow_plot(s["flows"]),
        "roc": _plots.roc_plot(
            audit["roc"],
            audit["epsilon"],
            float(audit["delta"] or 0),
            int(audit["non_members"] or 0),
        )
        if audit and audit["roc"]
        else None,
        "optimize": _plots.optimize_plot(optimize.get("figures", {}).get("candidates", []))
        if optimize.get("status") == "ok"
        else None,
    }
    return Report(evidence, s, summary, plots)


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("insitu.report", "templates"),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def num(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{float(value):,.{digits}f}"

    def pct(value: Any) -> str:
        return "-" if value is None else f"{100 * float(value):.2f}%"

    def size(value: Any) -> str:
        if value is None:
            return "-"
        value = int(value)
        if value < 10 * 1024:
            return f"{value:,} B"
        if value < 10 * 1024 * 1024:
            return f"{value / 1024:,.1f} KiB"
        return f"{value / 1024 / 1024:,.1f} MiB"

    def when(value: Any) -> str:
        text = str(value or "")
        return f"{text[:10]} {text[11:19]} UTC" if len(text) >= 19 else text or "-"

    s = report.sections
    model = s["models"]["versions"][-1]["model"] if s["models"]["versions"] else None
    title = model or str(s["training"]["config"].get("dataset", "federated model"))
    template = env.get_template("report.html.j2")
    return template.render(
        s=s,
        evidence=report.evidence,
        summary=report.summary,
        plots=report.plots,
        measures=_measures(s),
        annex=_annex(s, report.summary),
        flows_total=_flows_total(s["flows"]),
        records_total=_records_total(s["flows"]),
        total_entries=sum(len(le.entries) for le in report.evidence.ledgers),
        meta={
            "title": title,
            "version": insitu.__version__,
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": report.command,
        },
        num=num,
        pct=pct,
        when=when,
        bytes=size,
    )


def _records_total(flows: list[dict[str, Any]]) -> int | None:
    """The records the run's releases held at all sites; None when no site names them."""
    held = [f["records_held"] for f in flows if f["records_held"] is not None]
    return sum(held) if held else None


def find_chromium() -> Path:
    """The local Chromium binary.

    Raises:
        ReportError: none installed.

    """
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return Path(found)
    if Path("/usr/bin/chromium").is_file():
        return Path("/usr/bin/chromium")
    raise ReportError(
        "a PDF needs a local Chromium and none was found: install Debian's 'chromium' "
        "package (./scripts/bootstrap does), or use --format html"
    )


def render_pdf(html: str, out: Path, *, chromium: Path | None = None) -> None:
    """Print ``html`` to ``out`` (A4) with a local headless Chromium; written atomically.

    Raises:
        ReportError: no Chromium, or it failed to print.

    """
    binary = chromium or find_chromium()
    with tempfile.TemporaryDirectory(prefix="insitu-report-") as tmp:
        page = Path(tmp) / "report.html"
        pdf = Path(tmp) / "report.pdf"
        page.write_text(html, encoding="utf-8")
        command = [
            str(binary),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",  # root in containers; the page is our own, loads nothing
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-pdf-header-footer",
            f"--user-data-dir={Path(tmp) / 'profile'}",
            f"--print-to-pdf={pdf}",
            page.as_uri(),
        ]
        try:
            done = subprocess.run(command, capture_output=True, timeout=120, check=False)  # noqa: S603 -- a fixed argument list
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ReportError(
                f"Chromium could not print the report ({exc}); use --format html"
            ) from exc
        if not pdf.is_file() or pdf.stat().st_size == 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise ReportError(
                f"Chromium did not write the PDF (exit {done.returncode}: {' '.join(tail)}); "
                "use --format html"
            )
        atomic_write_bytes(out, pdf.read_bytes())


def write_report(
    paths: list[Path],
    out: Path,
    *,
    fmt: str = "html",
    allow_unverified: bool = False,
    command: str | None = None,
    run: str | None = None,
) -> Report:
    """Build the report from the workspaces at ``paths`` and write it to ``out``.

    ``run``: the federated run to report on (default: the latest completed one).

    Raises:
        UsageError: an unknown format, paths without a federated run, an unknown ``run``.
        UnverifiedEvidenceError: a ledger or an artefact failed verification and
            ``allow_unverified`` is false (nothing is written).
        ReportError: the PDF could not be printed.
        OSError: ``ELOOP`` if ``out`` is a symbolic link (insitu never writes through one).

    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use html or pdf")
    refuse_symlink(out)  # before the work; the write refuses a link planted meanwhile
    report = build_report(paths, run=run)
    if command:
        report.command = command
    if not report.evidence.verified and not allow_unverified:
        problems = report.evidence.problems
        raise UnverifiedEvidenceError(
            f"the evidence does not verify ({len(problems)} problem(s); first: {problems[0]}); "
            "no report written: restore the workspaces from a trusted copy, or pass "
            "--allow-unverified to write one marked UNVERIFIED"
        )
    html = render_html(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        atomic_write_text(out, html)
    else:
        render_pdf(html, out)
    return report
