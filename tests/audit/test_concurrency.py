"""Several processes appending at once, and a process killed in the middle of appends."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from insitu.workspace import Workspace

pytestmark = pytest.mark.slow


def _append(home: str, worker: int, count: int) -> int:
    with Workspace.open(home).ledger() as ledger:
        for index in range(count):
            ledger.record("test.concurrent", worker=worker, index=index)
    return count


def test_four_processes_times_500_appends_lose_nothing(workspace):
    before = len(workspace.ledger())
    with ProcessPoolExecutor(
        max_workers=4, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        done = list(pool.map(_append, [str(workspace.home)] * 4, range(4), [500] * 4))
    assert sum(done) == 2000
    with workspace.ledger() as ledger:
        report = ledger.verify()
        assert report.entries == before + 2000
        per_worker = [
            len(
                [
                    e
                    for e in ledger.entries(event_type="test.concurrent")
                    if e.payload["worker"] == w
                ]
            )
            for w in range(4)
        ]
    assert per_worker == [500] * 4


def test_sigkill_in_the_middle_of_appends_leaves_a_ledger_that_verifies(workspace):
    script = textwrap.dedent(
        f"""
        from insitu.workspace import Workspace
        with Workspace.open({str(workspace.home)!r}).ledger() as ledger:
            index = 0
            while True:
                ledger.record("test.crash", index=index, padding="x" * 500)
                index += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with workspace.ledger() as ledger:
                if len(ledger) > 300:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the appending process made no progress")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with workspace.ledger() as ledger:
        report = ledger.verify()
        assert report.entries > 300
        # The ledger is still writable after the crash: the next append continues the chain.
        ledger.record("test.after_crash")
        assert ledger.verify().entries == report.entries + 1
