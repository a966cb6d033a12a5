"""A site with an installed model: a workspace enrolled with an in-memory TUF repository."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from insitu.bundle import ModelCard, create_bundle, schema_of
from insitu.update import UpdateClient
from insitu.workspace import Workspace
from tests.bundle._models import build, mlp
from tests.update.repository_simulator import BASE_URL, RepositorySimulator

WIDTHS = [8, 16, 1]


@dataclass
class Site:
    workspace: Workspace
    sim: RepositorySimulator
    publisher: Ed25519PrivateKey
    publisher_enc: X25519PrivateKey

    def publish(self, version: str, model: bytes, name: str = "mlp") -> None:
        inputs, outputs = schema_of(model)
        card = ModelCard(name=name, version=version, inputs=inputs, outputs=outputs)
        recipients = [self.workspace.encryption_public_key, self.publisher_enc.public_key()]
        blob = create_bundle(model, card, self.publisher, recipients=recipients)
        self.sim.repo.publish(blob, publisher_key=self.publisher_enc)

    def update(self) -> dict[str, object]:
        """What 'insitu update' does, with the in-memory repository as the network."""
        with self.workspace.ledger() as ledger:
            client = UpdateClient(
                self.workspace.home / "update",
                device_key=self.workspace.encryption_key(),
                ledger=ledger,
                fetcher=self.sim,
            )
            return client.update()


def linear_model(coef: np.ndarray, intercept: float) -> bytes:
    """A logistic regression's logit: x @ coef + intercept (an ONNX graph)."""
    weights = [coef.reshape(-1, 1).astype(np.float32), np.array([intercept], dtype=np.float32)]
    return build([len(coef), 1], weights)


def make_site(home: Path, model: bytes, name: str = "mlp") -> Site:
    workspace, _ = Workspace.init(home, name="site")
    publisher = Ed25519PrivateKey.generate()
    sim = RepositorySimulator([publisher.public_key()])
    site = Site(workspace, sim, publisher, X25519PrivateKey.generate())
    UpdateClient.enroll(workspace.home / "update", root=sim.root_bytes, url=BASE_URL, model=name)
    site.publish("1.0.0", model, name=name)
    assert site.update()["installed"] == "1.0.0"
    return site


@pytest.fixture(scope="session")
def mlp_models() -> tuple[bytes, bytes]:
    return mlp(WIDTHS, seed=0)[0], mlp(WIDTHS, seed=1)[0]


@pytest.fixture
def site(tmp_path: Path, mlp_models: tuple[bytes, bytes]) -> Iterator[Site]:
    return make_site(tmp_path / "site", mlp_models[0])
