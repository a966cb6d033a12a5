"""Attacks on Ray, the simulation's engine: it phones out, and any local process joins it.

Found by an adversary (issue 15): during ``insitu federate simulate`` Ray's dashboard
process asked the AWS and Azure metadata address (169.254.169.254) and resolved GCP's
metadata name, although usage statistics were off; the cluster's address sat in the
world-readable ``/tmp/ray/session_*``, and a process that found it joined the cluster
without a password and ran code in the sites' workers, with their data and environment.
Flower wrote a persistent id of the machine to ``~/.flwr/source``.

Each test is one short run (3 sites, 1 round, no DP) with ``HOME`` pointing at an empty
directory, so that anything written to a home directory shows.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from insitu.datasets import builtin_data
from insitu.federated import FederationConfig, simulate

pytestmark = [
    pytest.mark.slow,
    # Ray's leftovers (see conftest._collect_ray_leftovers), never insitu's own.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

CONFIG = FederationConfig(sites=3, rounds=1, privacy="none", secure_aggregation=False)

#: An address in a connect()/sendto()/sendmsg() line of strace, IPv4 or IPv6.
_ADDRESS = re.compile(
    r'sin_port=htons\((?P<port>\d+)\), sin_addr=inet_addr\("(?P<v4>[^"]+)"\)'
    r'|sin6_port=htons\((?P<port6>\d+)\).*?inet_pton\(AF_INET6, "(?P<v6>[^"]+)"'
)
_CALL = re.compile(r"\b(connect|sendto|sendmsg|sendmmsg)\(")


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _outside_loopback(trace: str) -> list[str]:
    """The traced calls that address anything but the loopback interface."""
    found = []
    for line in trace.splitlines():
        if not _CALL.search(line):
            continue
        for match in _ADDRESS.finditer(line):
            address = match["v4"] or match["v6"]
            if not _is_loopback(address):
                found.append(f"{address}:{match['port'] or match['port6']} in {line[:160]}")
    return found


def _empty_home(tmp_path: Path, name: str = "home") -> Path:
    home = tmp_path / name
    home.mkdir()
    return home


def _strace() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (Debian: apt-get install strace)")
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    return strace


def test_attack_simulation_connects_only_to_loopback(workspace, tmp_path):
    strace = _strace()
    home = _empty_home(tmp_path)
    trace = tmp_path / "trace"
    env = os.environ | {"HOME": str(home)}
    run = subprocess.run(
        [strace, "-f", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(trace),
         str(Path(sys.executable).parent / "insitu"), "federate", "simulate",
         "--home", str(workspace.home), "--data", str(builtin_data("adult")),
         "--label", "income", "--sites", "3", "--rounds", "1", "--privacy", "none",
         "--no-secure-aggregation"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    calls = trace.read_text(errors="replace")
    assert "127.0.0.1" in calls  # the trace did see Ray's own (loopback) connections
    # Before: 169.254.169.254:80 twice (Azure, AWS) and the resolver (GCP's name).
    assert _outside_loopback(calls) == []
    # Flower's persistent id (~/.flwr/source) and Ray's token file (~/.ray) are not written.
    assert list(home.iterdir()) == []


def _join(address: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Another local process, a plain Ray user, joins the cluster and runs a task in it."""
    marker = tmp_path / "ran-in-the-cluster"
    script = textwrap.dedent(
        f"""
        import os, ray

        @ray.remote
        def steal():
            open({str(marker)!r}, "w").write(" ".join(sorted(os.environ)))

        ray.init(address={address!r}, log_to_driver=False)
        ray.get(steal.remote())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(_empty_home(tmp_path, "attacker"))
    env["RAY_py_gcs_connect_timeout_s"] = "10"  # how long it keeps knocking
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _on_command_lines(secret: str) -> list[str]:
    """Processes whose command line (readable by every user) holds ``secret``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if secret.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:  # the process ended
            continue
    return found


def test_attack_local_process_joins_ray_cluster(workspace, adult, tmp_path, monkeypatch):
    home = _empty_home(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    seen: dict[str, object] = {}

    def attack(_: object) -> None:  # in the driver, after round 1: Ray is up
        import ray

        session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
        seen["session"] = session
        seen["private_mode"] = stat.S_IMODE(session.parent.parent.stat().st_mode)
        seen["token_on_command_lines"] = _on_command_lines(os.environ["RAY_AUTH_TOKEN"])
        seen["join"] = _join(ray.get_runtime_context().gcs_address, tmp_path)

    simulate(workspace, adult, CONFIG, label="income", on_round=attack)
    join = seen["join"]
    assert isinstance(join, subprocess.CompletedProcess)
    assert join.returncode != 0, join.stdout
    assert "Authentication token is missing or incorrect" in join.stderr, join.stderr[-2000:]
    assert not (tmp_path / "ran-in-the-cluster").exists()
    assert seen["token_on_command_lines"] == []
    # The address is in a directory of this run that only its user can enter, not in
    # /tmp/ray; it is gone after the run, and nothing was written to the home directory.
    session = seen["session"]
    assert isinstance(session, Path)
    assert seen["private_mode"] == 0o700
    assert not session.is_relative_to("/tmp/ray")
    assert not session.parent.parent.exists()
    assert list(home.iterdir()) == []


def test_ray_imported_before_insitu_is_refused_before_anything_starts(workspace, tmp_path):
    # A script that imports ray first: Ray has read its token mode (none) already.
    script = textwrap.dedent(
        f"""
        import ray
        from insitu.errors import UsageError
        from insitu.federated import FederationConfig, simulate
        from insitu.workspace import Workspace

        config = FederationConfig(sites=3, rounds=1, privacy="none", secure_aggregation=False)
        try:
            simulate(Workspace.open({str(workspace.home)!r}), "never-read.csv", config)
        except UsageError as exc:
            print(exc)
        assert not ray.is_initialized()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(_empty_home(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ray was imported before insitu" in run.stdout
    with workspace.ledger() as ledger:
        assert ledger.entries(event_type="federation.started") == []
