"""Ledger throughput and verification time, beside a plain-SQLite anchor, in one run.

Anchor: the same SQLite file settings (WAL, synchronous=FULL, one transaction per
append) inserting the same payload text with no hashing, chaining or signing; and, for
verification, a plain read of every row. The ratios are the cost of making the log
evidence rather than a table.

    .venv/bin/python benchmarks/ledger_bench.py [--appends 5000] [--verify-entries 100000]

Writes benchmarks/results/ledger.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from insitu.audit import Ledger
from insitu.workspace import Workspace

PAYLOAD = {"model": "adult-income", "round": 7, "accuracy": 0.8412, "epsilon_spent": 1.25}


def plain_sqlite_appends(path: Path, count: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, time TEXT, type TEXT, payload TEXT)")
    text = json.dumps(PAYLOAD, sort_keys=True)
    started = time.perf_counter()
    for _ in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO t (time, type, payload) VALUES (?, ?, ?)",
            (time.time(), "training.round", text),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return count / elapsed


def insitu_appends(ledger: Ledger, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        ledger.record("training.round", **PAYLOAD)
    return count / (time.perf_counter() - started)


def _worker(home: str, count: int) -> None:
    with Workspace.open(home).ledger() as ledger:
        ledger._key()  # load the key before the clock starts in the parent's view
        for _ in range(count):
            ledger.record("training.round", **PAYLOAD)


def _plain_worker(path: str, count: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA synchronous=FULL")
    text = json.dumps(PAYLOAD, sort_keys=True)
    for _ in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO t (time, type, payload) VALUES (?, ?, ?)",
            (time.time(), "training.round", text),
        )
        conn.execute("COMMIT")
    conn.close()


def _warm(_: int) -> None:
    import insitu.workspace  # noqa: F401 -- the import is the warm-up


def parallel(fn, target: str, processes: int, count: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
        # Start the workers before the clock: spawning is not what is measured.
        list(pool.map(_warm, range(processes * 4)))
        started = time.perf_counter()
        list(pool.map(fn, [target] * processes, [count] * processes))
        elapsed = time.perf_counter() - started
    return processes * count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=5000)
    parser.add_argument("--verify-entries", type=int, default=100_000)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ledger.json"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws, _ = Workspace.init(root / "ws")
        results: dict[str, object] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
            },
        }

        anchor_rate = plain_sqlite_appends(root / "plain.db", args.appends)
        with ws.ledger() as ledger:
            ledger._key()
            insitu_rate = insitu_appends(ledger, args.appends)
        results["append_single_process"] = {
            "appends": args.appends,
            "plain_sqlite_per_s": round(anchor_rate),
            "insitu_signed_per_s": round(insitu_rate),
            "insitu_over_anchor": round(insitu_rate / anchor_rate, 3),
        }
        print(f"single process: insitu {insitu_rate:.0f}/s, plain SQLite {anchor_rate:.0f}/s")

        per = max(args.appends // 4, 100)
        plain4 = parallel(_plain_worker, str(root / "plain.db"), 4, per)
        insitu4 = parallel(_worker, str(ws.home), 4, per)
        results["append_4_processes"] = {
            "appends": 4 * per,
            "plain_sqlite_per_s": round(plain4),
            "insitu_signed_per_s": round(insitu4),
            "insitu_over_anchor": round(insitu4 / plain4, 3),
        }
        print(f"4 processes: insitu {insitu4:.0f}/s, plain SQLite {plain4:.0f}/s")

        with ws.ledger() as ledger:
            missing = args.verify_entries - len(ledger)
            started = time.perf_counter()
            for _ in range(max(missing, 0)):
                ledger.record("training.round", **PAYLOAD)
            fill_s = time.perf_counter() - started
            print(f"filled to {len(ledger)} entries in {fill_s:.1f} s")
            started = time.perf_counter()
            rows = ledger._conn.execute("SELECT * FROM entries").fetchall()
            read_s = time.perf_counter() - started
            report = ledger.verify()
        results["verify"] = {
            "entries": report.entries,
            "plain_read_s": round(read_s, 3),
            "insitu_verify_s": round(report.seconds, 3),
            "insitu_over_anchor": round(report.seconds / read_s, 1),
            "rows_read": len(rows),
        }
        print(
            f"verify {report.entries} entries: {report.seconds:.2f} s (plain read {read_s:.2f} s)"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
