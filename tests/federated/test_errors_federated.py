"""Federated runs refused: sites too small for the epsilon asked, a site not registered.

:func:`insitu.federated.simulate` checks each site's share against the epsilon before it
creates a site or starts Flower's simulation, so the first test runs no simulation (no
Ray). The second deploys: a real SuperLink (``insitu federate server``) refuses a
SuperNode whose key it never registered.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from insitu.data import DataSchema, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.errors import InsufficientDataError, SiteRefusedError
from insitu.federated import (
    FederationCerts,
    FederationConfig,
    join,
    make_certs,
    min_rows_for,
    simulate,
)
from insitu.workspace import Workspace

INSITU = str(Path(sys.executable).parent / "insitu")


def test_sites_too_small_for_the_epsilon_are_refused_before_anything_runs(workspace, adult):
    # Ten small clinics sharing 2,000 records, asking for epsilon 0.5 over five rounds at
    # batch 256 (the batch chosen from a site's size makes such sites trainable).
    config = FederationConfig(sites=10, rounds=5, epsilon=0.5, batch_size=256)
    assert 2000 * (1 - config.test_fraction) / config.sites < min_rows_for(config)
    with pytest.raises(
        InsufficientDataError,
        match=r"site-\d\d would hold about \d+ training records; epsilon 0\.5 over 5 rounds "
        r"needs at least \d+ per site .* use fewer sites or rounds, or a larger epsilon",
    ):
        simulate(workspace, adult.head(2000), config, label="income")
    assert not (workspace.home / "sites").exists()
    with workspace.ledger() as ledger:
        assert not ledger.entries(event_type="federation.")


# -- a deployed federation (Flower's SuperLink and SuperNode: processes, no Ray) -----


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def schema(tmp_path: Path) -> Path:
    """The carried Adult schema, with a stated legal basis instead of per-record consent."""
    text = builtin_schema("adult").read_text()
    text = text.replace(
        "required = true", 'required = false\nlegal_basis = "GDPR art. 6(1)(f), test"'
    )
    path = tmp_path / "adult.schema.toml"
    path.write_text(text)
    return path


@pytest.fixture
def server(tmp_path: Path, schema: Path) -> Iterator[tuple[str, FederationCerts]]:
    """``insitu federate server`` waiting for its three registered sites."""
    certs = make_certs(tmp_path / "certs", sites=["hospital-a", "hospital-b", "hospital-c"])
    Workspace.init(tmp_path / "server", name="server")
    address = f"127.0.0.1:{_free_port()}"
    process = subprocess.Popen(
        [
            *(INSITU, "federate", "server", "--home", str(tmp_path / "server")),
            *("-s", str(schema), "--certs", str(certs.directory), "--address", address),
            *("--sites", "3", "--rounds", "1", "--timeout", "300"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield address, certs
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


@pytest.mark.slow
def test_a_site_whose_key_the_server_never_registered_is_refused(tmp_path, schema, server):
    address, certs = server
    stranger = make_certs(tmp_path / "strangers", sites=["rogue"])  # the right CA, not its key
    data = tmp_path / "rogue.csv"
    read_table(builtin_data("adult")).head(3000).to_csv(data, index=False)
    with pytest.raises(
        SiteRefusedError,
        match=rf"the server at {address} refused this site: its key .* is not registered "
        r"there, or is in use by an active node .*; ask the operator to register rogue\.pub",
    ):
        join(
            tmp_path / "rogue",
            data,
            schema=DataSchema.load(schema),
            server=address,
            ca=certs.ca,
            key=stranger.site_key("rogue"),
            retries=6,
            once=True,
        )
    with Workspace.open(tmp_path / "rogue").ledger() as ledger:
        assert not ledger.entries(event_type="privacy.spent")
