"""A deployed federation under faults: a site killed in a round, the server killed and resumed.

The real multi-process path on loopback: ``insitu federate server`` and three
``insitu federate site`` processes, each starting Flower's own (SuperLink behind the
Fleet gateway, SuperNodes, SuperExec, ServerApp, ClientApps). Faults are SIGKILL, which
no ``finally`` survives: what is left must be consistent because of how state is kept
(checkpoints, ledgers, the SuperLink's database), not because a handler ran.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from insitu.cli import run
from insitu.data import read_table
from insitu.datasets import builtin_data
from insitu.federated._certs import FederationCerts, make_certs
from insitu.workspace import Workspace

from .test_deploy import INSITU, _descendants, free_port

SITES = ("hospital-a", "hospital-b", "hospital-c")


def _server(
    tmp_path: Path, schema: Path, certs: FederationCerts, address: str, *extra: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            INSITU,
            "federate",
            "server",
            "--home",
            str(tmp_path / "server"),
            "-s",
            str(schema),
            "--certs",
            str(certs.directory),
            "--address",
            address,
            "--timeout",
            "600",
            "--json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _sites(
    tmp_path: Path, schema: Path, certs: FederationCerts, address: str
) -> dict[str, subprocess.Popen[bytes]]:
    frame = read_table(builtin_data("adult"))
    procs = {}
    for index, name in enumerate(SITES):
        data = tmp_path / f"{name}.csv"
        frame.iloc[index * 3000 : (index + 1) * 3000].to_csv(data, index=False)
        procs[name] = subprocess.Popen(
            [
                INSITU,
                "federate",
                "site",
                "--home",
                str(tmp_path / name),
                "--data",
                str(data),
                "-s",
                str(schema),
                "--ca",
                str(certs.ca),
                "--key",
                str(certs.site_key(name)),
                "--server",
                address,
                "--retries",
                "6",
                "--once",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    return procs


def _run_dir(tmp_path: Path) -> Path | None:
    runs = tmp_path / "server" / "federation" / "runs"
    found = sorted(runs.iterdir()) if runs.is_dir() else []
    return found[0] if found else None


def _wait_for_progress(tmp_path: Path, text: str, server: subprocess.Popen[bytes]) -> Path:
    """The run's directory, once its progress line starts with ``text``."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        run_dir = _run_dir(tmp_path)
        progress = run_dir / "progress.txt" if run_dir else None
        if progress and progress.exists() and progress.read_text().startswith(text):
            return run_dir  # type: ignore[return-value]
        assert server.poll() is None, server.communicate()[1].decode()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no progress line {text!r} within 400 s")


def _no_orphans(pids: set[int]) -> set[int]:
    """Which of ``pids`` are still alive, a few seconds after what started them died."""
    deadline = time.monotonic() + 20
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)}
        time.sleep(0.5)
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _finish(*procs: subprocess.Popen[bytes]) -> None:
    for process in procs:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def _audit_verify(home: Path) -> int:
    return run(["audit", "verify", "--home", str(home), "--json"])


@pytest.mark.slow
def test_a_server_killed_after_round_2_resumes_and_charges_each_round_honestly(
    tmp_path: Path, schema_file: Path, capsys
) -> None:
    certs = make_certs(tmp_path / "certs", sites=list(SITES))
    address = f"127.0.0.1:{free_port()}"
    Workspace.init(tmp_path / "server", name="server")
    server = _server(
        tmp_path, schema_file, certs, address, "--sites", "3", "--rounds", "4", "--epsilon", "3"
    )
    procs = _sites(tmp_path, schema_file, certs, address)
    resumed: subprocess.Popen[bytes] | None = None
    try:
        run_dir = _wait_for_progress(tmp_path, "round 2/4", server)
        started_by_server = _descendants(server.pid)
        server.send_signal(signal.SIGKILL)  # the machine's power, as far as insitu can tell
        server.wait(10)
        assert _no_orphans(started_by_server) == set()  # SuperLink and ServerApp died too
        resumed = _server(tmp_path, schema_file, certs, address, "--resume", run_dir.name)
        out, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err.decode()[-3000:]
        sites = {n: p.communicate(timeout=120) for n, p in procs.items()}
    finally:
        _finish(server, *procs.values(), *([resumed] if resumed else []))

    result = json.loads(out)
    assert result["run_id"] == run_dir.name
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, 4]
    with Workspace.open(tmp_path / "server").ledger() as ledger:
        kinds = [e.type for e in ledger.entries() if e.type.startswith("federation.")]
        assert "federation.resumed" in kinds
        [completed] = ledger.entries(event_type="federation.completed")
        linked = {e.seq: e.payload for e in ledger.entries(event_type="federation.round")}
        rounds_linked = [linked[seq]["round"] for seq in completed.payload["round_entries"]]
        assert rounds_linked == [1, 2, 3, 4]
    for name, (_, site_err) in sites.items():
        assert procs[name].returncode == 0, site_err.decode()[-2000:]
        with Workspace.open(tmp_path / name).ledger() as ledger:
            trained = [
                e.payload["round"]
                for e in ledger.entries(event_type="federation.site_round")
                if e.payload.get("run") == run_dir.name
            ]
            # Rounds 1-2 once; round 3 again if it had trained before the crash; 4 once.
            assert trained[:2] == [1, 2]
            assert trained[-1] == 4
            assert set(trained) == {1, 2, 3, 4}
            assert trained.count(1) == trained.count(2) == trained.count(4) == 1
            spent = ledger.entries(event_type="privacy.spent")
            assert len([e for e in spent if e.payload["mechanism"] == "dp-sgd"]) == len(trained)
    for home in ("server", *SITES):
        assert _audit_verify(tmp_path / home) == 0, capsys.readouterr()
    assert Path(result["model_dir"]).exists()


def test_resuming_a_run_this_workspace_never_had_is_one_line_and_starts_nothing(
    tmp_path: Path, schema_file: Path, capsys
) -> None:
    certs = make_certs(tmp_path / "certs", sites=list(SITES))
    Workspace.init(tmp_path / "server", name="server")
    code = run(
        [
            *("federate", "server", "--home", str(tmp_path / "server"), "-s", str(schema_file)),
            *("--certs", str(certs.directory), "--address", f"127.0.0.1:{free_port()}"),
            *("--resume", "20990101T000000Z-abcdef"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "no deployed run '20990101T000000Z-abcdef'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "server" / "federation" / "runs").exists()
