"""A deployed federation that loses a site in round 2: the site is named, the others finish.

The real multi-process path on loopback, as in ``test_deploy_faults`` (whose helpers this
uses); a file of its own so that the two long fault runs can go to two test workers.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from insitu.federated._certs import make_certs
from insitu.workspace import Workspace

from .test_deploy import _descendants, free_port
from .test_deploy_faults import (
    SITES,
    _audit_verify,
    _finish,
    _no_orphans,
    _server,
    _sites,
    _wait_for_progress,
)


@pytest.mark.slow
def test_a_site_killed_in_round_2_is_named_and_the_others_finish(
    tmp_path: Path, schema_file: Path, capsys
) -> None:
    certs = make_certs(tmp_path / "certs", sites=list(SITES))
    address = f"127.0.0.1:{free_port()}"
    Workspace.init(tmp_path / "server", name="server")
    server = _server(
        tmp_path, schema_file, certs, address, "--sites", "3", "--rounds", "2", "--epsilon", "3"
    )
    procs = _sites(tmp_path, schema_file, certs, address)
    try:
        _wait_for_progress(tmp_path, "round 1/2", server)
        lost = procs["hospital-c"]
        started_by_lost = _descendants(lost.pid)
        lost.send_signal(signal.SIGKILL)
        lost.wait(10)
        out, err = server.communicate(timeout=600)
        assert server.returncode == 0, err.decode()[-3000:]
        others = {n: p.communicate(timeout=120) for n, p in procs.items() if n != "hospital-c"}
    finally:
        _finish(server, *procs.values())

    # The killed site's SuperNode and ClientApps died with it: nothing trains on.
    assert _no_orphans(started_by_lost) == set()
    result = json.loads(out)
    rounds = result["rounds"]
    assert [r["sites_ok"] for r in rounds] == [3, 2]
    assert rounds[1]["missing"] == {"hospital-c": "dropout"}
    # The final accuracy covers the two sites that were there, and says so.
    assert rounds[1]["sites_evaluated"] == 2
    assert rounds[1]["accuracy"] is not None
    assert rounds[1]["accuracy"] > 0.6
    with Workspace.open(tmp_path / "server").ledger() as ledger:
        recorded = [e.payload for e in ledger.entries(event_type="federation.round")]
        assert recorded[1]["missing"] == {"hospital-c": "dropout"}
        assert sorted(recorded[1]["participants"]) == ["hospital-a", "hospital-b"]
        assert ledger.entries(event_type="federation.completed")
    for name, (_, site_err) in others.items():
        assert procs[name].returncode == 0, site_err.decode()[-2000:]
    for home in ("server", "hospital-a", "hospital-b", "hospital-c"):
        assert _audit_verify(tmp_path / home) == 0, capsys.readouterr()
