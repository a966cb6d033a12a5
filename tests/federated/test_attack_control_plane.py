"""The server's public port carries the Fleet API only: a site or an outsider runs nothing else.

Attacker's position: they reach the port sites dial, hold the federation's public
``ca.pem`` and, in the worst case, a registered site's private key. With Flower's own
Control client (what ``flwr supernode register`` and ``flwr ls`` use) and with raw
requests signed as that site, they try to register a key of their own, list, start and
stop runs, and call the ServerAppIo/Runtime API. The quick tests run the gateway in
front of a recording stand-in for the SuperLink, so they can also show that a refused
request never reaches it; :func:`attack_control_plane` is run against a real server
during the three-site federation in ``test_deploy.py``.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.errors import FederationError
from insitu.federated._certs import make_certs, make_loopback_identity
from insitu.federated._gateway import FleetGateway, RunStates

#: What an outsider or a site might try on the Control, ServerAppIo and docs routes.
FORBIDDEN = (
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/control/list-nodes"),
    ("POST", "/v1/control/unregister-node"),
    ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/runtime/pull-task-input"),
    ("POST", "/v1/runtime/pull-messages"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/list-runs"),
    ("GET", "/v1/fleet/pull-messages"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/health"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def signed_headers(openssh_private_key: bytes) -> dict[str, str]:
    """A request signed as the key's SuperNode, as Flower's Fleet client signs one."""
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = serialization.load_ssh_private_key(openssh_private_key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    timestamp = dt.datetime.now(dt.UTC).isoformat()
    return {
        "flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-signature": base64.b64encode(sign_message(key, timestamp.encode())).decode(),
        "flwr-timestamp": timestamp,
        "content-type": "application/protobuf",
    }


def attack_control_plane(address: str, ca: Path, site_key: Path | None) -> list[str]:
    """Try every operator operation at ``address``; what succeeded (empty: all refused).

    With Flower's own Control client (``flwr``'s), then with raw requests (signed as
    the site whose ``site_key`` is given).
    """
    from cryptography.hazmat.primitives.asymmetric import ec as ec_
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        ListRunsRequest,
        RegisterNodeRequest,
        StopRunRequest,
    )
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    succeeded: list[str] = []
    client = ControlHttpClient.from_server_address(
        server_address=address,
        insecure=False,
        root_certificates=ca.read_bytes(),
        interceptors=[],
    )
    rogue = public_key_to_bytes(ec_.generate_private_key(ec_.SECP384R1()).public_key())
    calls = {
        "RegisterNode": lambda: client.RegisterNode(
            RegisterNodeRequest(public_key=rogue, name="rogue")
        ),
        "ListRuns": lambda: client.ListRuns(ListRunsRequest()),
        "ListNodes": lambda: client.ListNodes(ListNodesRequest()),
        "StopRun": lambda: client.StopRun(StopRunRequest(run_id=1)),
    }
    try:
        for name, call in calls.items():
            try:
                call()
            except Exception:  # noqa: BLE001 -- any refusal will do; success is the finding
                continue
            succeeded.append(f"flwr Control {name}")
    finally:
        client.close()
    headers = signed_headers(site_key.read_bytes()) if site_key else {}
    context = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=f"https://{address}", verify=context, timeout=10) as http:
        for method, path in FORBIDDEN:
            answer = http.request(method, path, headers=headers, content=b"\x00")
            if answer.status_code != 404:
                succeeded.append(f"{method} {path}: {answer.status_code}")
    return succeeded


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in SuperLink: answers 200 to everything and remembers what reached it."""

    seen: list[tuple[str, str, dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append(("POST", self.path, dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok!")

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, Path, RunStates, list]]:
    """A gateway on loopback in front of a recording stand-in, over real TLS both ways."""
    certs = make_certs(tmp_path / "certs", sites=["hospital-a"])
    identity = make_loopback_identity(tmp_path / "loopback")
    seen: list[tuple[str, str, dict[str, str], bytes]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(identity.cert, identity.key)
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    states = RunStates()
    port = free_port()
    try:
        with FleetGateway(
            host="127.0.0.1",
            port=port,
            certfile=certs.server_cert,
            keyfile=certs.server_key,
            upstream=f"https://127.0.0.1:{upstream.server_address[1]}",
            upstream_ca=identity.ca,
            states=states,
        ):
            yield f"127.0.0.1:{port}", certs.directory, states, seen
    finally:
        upstream.shutdown()
        upstream.server_close()
        thread.join(5)


def test_attack_rogue_supernode_registration(gateway) -> None:
    """With only ca.pem: register a key of one's own, list, start, stop: all refused."""
    address, certs, _, seen = gateway
    assert attack_control_plane(address, certs / "ca.pem", None) == []
    assert seen == []  # nothing reached the SuperLink


def test_attack_registered_site_key_reaches_no_operator_route(gateway) -> None:
    address, certs, _, seen = gateway
    site_key = certs / "sites" / "hospital-a.key"
    assert attack_control_plane(address, certs / "ca.pem", site_key) == []
    assert seen == []


def test_fleet_operations_reach_the_superlink_with_their_signature_intact(gateway) -> None:
    address, certs, _, seen = gateway
    headers = signed_headers((certs / "sites" / "hospital-a.key").read_bytes())
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with httpx.Client(base_url=f"https://{address}", verify=context, timeout=10) as http:
        answer = http.post("/v1/fleet/pull-messages", headers=headers, content=b"\x01\x02")
    assert (answer.status_code, answer.content) == (200, b"ok!")
    [(method, path, forwarded, body)] = seen
    assert (method, path, body) == ("POST", "/v1/fleet/pull-messages", b"\x01\x02")
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp", "content-type"):
        assert forwarded[name] == headers[name]


def test_sites_learn_how_a_run_ended(gateway) -> None:
    address, certs, states, _ = gateway
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with httpx.Client(base_url=f"https://{address}", verify=context, timeout=10) as http:
        assert http.get("/insitu/v1/runs/r1").status_code == 404
        states.set("r1", "running")
        assert http.get("/insitu/v1/runs/r1").json() == {"run": "r1", "state": "running"}
        assert not states.wait_told("r1", 1, timeout=0)
        states.set("r1", "finished")
        assert http.get("/insitu/v1/runs/r1").json()["state"] == "finished"
        assert states.wait_told("r1", 1, timeout=0)


def test_a_gateway_address_in_use_is_named(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", sites=["a"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = FleetGateway(
            host="127.0.0.1",
            port=port,
            certfile=certs.server_cert,
            keyfile=certs.server_key,
            upstream="https://127.0.0.1:9",
            upstream_ca=certs.ca,
            states=RunStates(),
        )
        with pytest.raises(FederationError, match=f"cannot listen on 127.0.0.1:{port}"):
            gateway.__enter__()


def test_a_superlink_that_is_not_up_is_a_503_not_a_dropped_connection(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", sites=["a"])
    identity = make_loopback_identity(tmp_path / "loopback")
    port = free_port()
    with FleetGateway(
        host="127.0.0.1",
        port=port,
        certfile=certs.server_cert,
        keyfile=certs.server_key,
        upstream=f"https://127.0.0.1:{free_port()}",
        upstream_ca=identity.ca,
        states=RunStates(),
    ):
        context = ssl.create_default_context(cafile=str(certs.ca))
        with httpx.Client(verify=context, timeout=10) as http:
            answer = http.post(f"https://127.0.0.1:{port}/v1/fleet/get-run", content=b"")
    assert answer.status_code == 503
    assert "retry" in json.loads(answer.content)["error"]


def test_the_loopback_identity_is_private_and_for_loopback_only(tmp_path: Path) -> None:
    from cryptography import x509

    identity = make_loopback_identity(tmp_path / "loopback")
    assert (tmp_path / "loopback").stat().st_mode & 0o777 == 0o700
    assert identity.key.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert sorted(p.name for p in identity.ca.parent.iterdir()) == [
        "ca.pem",
        "server.key",
        "server.pem",
    ]
