from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from freezegun import freeze_time

from insitu.audit import Ledger
from insitu.bundle import ModelCard, create_bundle, schema_of
from insitu.update import UpdateClient
from tests.bundle._models import fine_tune, mlp
from tests.update.repository_simulator import BASE_URL, RepositorySimulator

WIDTHS = [16, 32, 4]


def frozen_at(when: dt.datetime) -> Any:
    """``freeze_time(when)`` that never imports pandas while the clock is fake.

    freezegun reads every attribute of every loaded module when it starts, and
    ``insitu.data`` loads pandas on first attribute access; pandas 3 imported under
    freezegun's fake ``datetime`` crashes the interpreter (SIGSEGV in the garbage
    collector: pandas-dev/pandas#64023). Whether pandas was loaded before depends on the
    tests that ran first, so the module is skipped here rather than hoped loaded.
    """
    return freeze_time(when, ignore=["insitu.data"])


@dataclass
class Keys:
    publisher: Ed25519PrivateKey
    publisher_enc: X25519PrivateKey
    device: X25519PrivateKey


@dataclass
class Models:
    v1: bytes
    v2: bytes  # last layer fine-tuned
    v3: bytes  # full fine-tune


@pytest.fixture(scope="session")
def models() -> Models:
    base, weights = mlp(WIDTHS)
    return Models(
        base,
        fine_tune(WIDTHS, weights, last_layer_only=True),
        fine_tune(WIDTHS, weights, last_layer_only=False, seed=2),
    )


@pytest.fixture
def keys() -> Keys:
    return Keys(
        Ed25519PrivateKey.generate(), X25519PrivateKey.generate(), X25519PrivateKey.generate()
    )


def make_bundle(
    keys: Keys,
    version: str,
    model: bytes,
    *,
    signer: Ed25519PrivateKey | None = None,
    recipients: list | None = None,
    republishes: str | None = None,
) -> bytes:
    inputs, outputs = schema_of(model)
    card = ModelCard(
        name="mlp",
        version=version,
        inputs=inputs,
        outputs=outputs,
        metrics={"accuracy": 0.9},
        privacy={"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
        republishes=republishes,
    )
    if recipients is None:
        recipients = [keys.device.public_key(), keys.publisher_enc.public_key()]
    return create_bundle(model, card, signer or keys.publisher, recipients=recipients)


@pytest.fixture
def sim(keys: Keys) -> RepositorySimulator:
    return RepositorySimulator([keys.publisher.public_key()])


@pytest.fixture
def device(tmp_path: Path, sim: RepositorySimulator, keys: Keys, ledger: Ledger) -> UpdateClient:
    UpdateClient.enroll(tmp_path / "device", root=sim.root_bytes, url=BASE_URL, model="mlp")
    return UpdateClient(tmp_path / "device", device_key=keys.device, ledger=ledger, fetcher=sim)


def device_state(client: UpdateClient) -> dict[str, bytes]:
    """Every file of the trusted metadata and the install slots, by relative path."""
    files = {}
    for sub in ("metadata", "slots"):
        for path in sorted((client.directory / sub).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(client.directory))] = path.read_bytes()
    files["root.json"] = (client.directory / "root.json").read_bytes()
    return files


def installed_v1(
    sim: RepositorySimulator, device: UpdateClient, keys: Keys, models: Models
) -> bytes:
    """Publish and install 1.0.0; return its bundle bytes."""
    bundle = make_bundle(keys, "1.0.0", models.v1)
    sim.repo.publish(bundle, publisher_key=keys.publisher_enc)
    assert device.update()["installed"] == "1.0.0"
    return bundle


def events(ledger: Ledger, prefix: str = "update.") -> list[str]:
    return [e.type for e in ledger.entries(event_type=prefix)]


def assert_slots_unchanged(client: UpdateClient, before: dict[str, bytes]) -> None:
    after = device_state(client)
    assert {k: v for k, v in after.items() if k.startswith("slots")} == {
        k: v for k, v in before.items() if k.startswith("slots")
    }


def assert_only_genuine_metadata(client: UpdateClient, sim: RepositorySimulator) -> None:
    """Every trusted metadata file on the device is one the repository really signed.

    TUF stores each file as soon as it verifies, so after an attack in which the genuine
    repository moved forward the device may hold newer genuine metadata, but never a
    file the attacker made or replayed out of place.
    """
    for path in sorted(client.metadata_dir.rglob("*.json")):
        role = path.name.split(".")[-2]
        genuine = [
            data
            for stored, versions in sim.storage.history.items()
            if stored.startswith("metadata/") and stored.rsplit("/", 1)[-1].split(".")[-2] == role
            for data in versions
        ]
        assert path.read_bytes() in genuine, path
