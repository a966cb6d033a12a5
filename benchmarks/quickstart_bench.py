"""The quickstart's wall-clock time by step, and the report's cost beside its anchor.

Runs ``insitu quickstart`` (default settings: 5 sites, 5 rounds, all 30,162 rows) in a
fresh directory, then times building the report from its output against the anchor:
verifying the same ledgers with ``Ledger.verify`` and nothing else (the part of a report
no honest report can skip). The ratio is what reading, checking artefacts, plotting and
rendering add on top of verification.

    .venv/bin/python benchmarks/quickstart_bench.py [--sites 5] [--rounds 5] [--rows N]

Writes benchmarks/results/quickstart.json, with ``os.getloadavg()`` before and after:
the machine is shared, and the quickstart's time moves with the load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from insitu.cli import run
from insitu.report import build_report, find_workspaces, render_html
from insitu.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "qs"
        argv = ["quickstart", "--out", str(out), "--sites", str(args.sites)]
        argv += ["--rounds", str(args.rounds), "--json"]
        if args.rows:
            argv += ["--rows", str(args.rows)]
        buffer = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(buffer):
            code = run(argv)
        quickstart_seconds = time.perf_counter() - started
        if code != 0:
            sys.exit(f"quickstart failed with exit code {code}")
        summary = json.loads(buffer.getvalue())

        anchor, report = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            entries = 0
            for home in find_workspaces([out]):
                with Workspace.open(home).ledger() as ledger:
                    entries += ledger.verify().entries
            anchor.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            built = build_report([out])
            page = render_html(built)
            report.append(time.perf_counter() - t0)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            # Judge the load, do not assume it: a 1-minute load above one core's worth
            # means other work shared the machine and the times are inflated.
            "note": (
                "quiet machine"
                if load_before[0] < 1.0
                else "loaded machine: other work was running; times are inflated"
            ),
        },
        "settings": {"sites": args.sites, "rounds": args.rounds, "rows": args.rows},
        "quickstart_seconds": round(quickstart_seconds, 2),
        "steps_seconds": {s["step"]: s["seconds"] for s in summary["steps"]},
        "figures": {
            "private_accuracy": summary["private_accuracy"],
            "baseline_accuracy": summary["baseline_accuracy"],
            "attack_auc": summary["attack_auc"],
            "epsilon_by_site": summary["epsilon_by_site"],
        },
        "report": {
            "ledger_entries": entries,
            "anchor_verify_seconds": round(min(anchor), 3),
            "insitu_report_seconds": round(min(report), 3),
            "ratio": round(min(report) / min(anchor), 2),
            "html_bytes": len(page.encode()),
        },
    }
    path = Path(__file__).parent / "results" / "quickstart.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
