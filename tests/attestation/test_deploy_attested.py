"""End to end: ``insitu federate server --attest`` and real sites, each with its own swtpm.

Three sites whose build is the allowed one (a frozen copy of this build) attest, are
admitted and train one round; a fourth, registered site runs the same copy with one byte
added and is refused at join with one line naming PCR 23; the server's ledger holds all
four decisions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from insitu.data import read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.federated import make_certs
from insitu.federated._processes import free_port
from insitu.workspace import Workspace

from .conftest import modified_build, snapshot

INSITU = str(Path(sys.executable).parent / "insitu")
_RUN_FROM = (
    "import sys, insitu; from insitu.cli import run; "
    "assert insitu.__file__.startswith(sys.argv[1]), insitu.__file__; "
    "sys.exit(run(sys.argv[2:]))"
)


@pytest.mark.slow
def test_attested_sites_train_and_a_modified_build_is_refused(
    start_swtpm: Callable[[str], str], tmp_path: Path
) -> None:
    names = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    certs = make_certs(tmp_path / "certs", sites=names)
    tctis = {name: start_swtpm(name) for name in names}
    env = {**os.environ, "INSITU_PASSPHRASE": "attestation-tests"}
    for name in names:  # each site prints its AK; the operator enrolls it
        ak = certs.directory / "sites" / f"{name}.ak.pem"
        subprocess.run(
            [INSITU, "attest", "key", "--tcti", tctis[name], "--out", str(ak)],
            env=env,
            check=True,
            capture_output=True,
        )
    # The release: a frozen copy of this build (the tree under test may change meanwhile).
    release = snapshot(tmp_path)
    modified = modified_build(tmp_path, release)
    allow = tmp_path / "allow.toml"
    subprocess.run(
        [
            *(INSITU, "attest", "allow", "--out", str(allow), "--name", "release"),
            *("--root", str(release / "insitu")),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    schema = tmp_path / "adult.schema.toml"
    schema.write_text(
        builtin_schema("adult")
        .read_text()
        .replace("required = true", 'required = false\nlegal_basis = "GDPR art. 6(1)(f), test"')
    )
    Workspace.init(tmp_path / "server", name="server")
    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [
            *(INSITU, "federate", "server", "--home", str(tmp_path / "server")),
            *("-s", str(schema), "--certs", str(certs.directory), "--address", address),
            *("--sites", "3", "--rounds", "1", "--epsilon", "3", "--timeout", "400"),
            *("--attest", str(allow), "--json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    frame = read_table(builtin_data("adult"))
    sites: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for index, name in enumerate(names):
            data = tmp_path / f"{name}.csv"
            frame.iloc[index * 3000 : (index + 1) * 3000].to_csv(data, index=False)
            command = [
                *("federate", "site", "--home", str(tmp_path / name), "--data", str(data)),
                *("-s", str(schema), "--ca", str(certs.ca), "--key", str(certs.site_key(name))),
                *("--server", address, "--retries", "6", "--once"),
            ]
            build = modified if name == "hospital-d" else release
            site_env = {**env, "INSITU_TPM_TCTI": tctis[name], "PYTHONPATH": str(build)}
            command = [sys.executable, "-c", _RUN_FROM, str(build), *command]
            sites[name] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=site_env
            )
        results = {name: p.communicate(timeout=600) for name, p in sites.items()}
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            assert sites[name].returncode == 0, results[name][1].decode()[-2000:]
        out, err = server.communicate(timeout=120)
        assert server.returncode == 0, err.decode()[-3000:]
    finally:
        for process in (server, *sites.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)

    assert [r["sites_ok"] for r in json.loads(out)["rounds"]] == [3]
    refused = results["hospital-d"][1].decode().strip().splitlines()
    assert sites["hospital-d"].returncode == 1
    assert len(refused) == 1, refused
    assert "site hospital-d refused: PCR 23 is" in refused[0]
    assert not (tmp_path / "hospital-d").exists()
    with Workspace.open(tmp_path / "server").ledger() as ledger:
        checks = {
            e.payload["subject"]: e.payload
            for e in ledger.entries(event_type="attestation.checked")
        }
        ledger.verify()
    assert {name: c["decision"] for name, c in checks.items()} == {
        "hospital-a": "admitted",
        "hospital-b": "admitted",
        "hospital-c": "admitted",
        "hospital-d": "refused",
    }
    assert checks["hospital-d"]["pcr"] == 23
    run_id = json.loads(out)["run_id"]
    assert {c["run"] for c in checks.values()} == {run_id}
