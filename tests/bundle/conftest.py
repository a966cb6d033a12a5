from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from insitu.bundle import ModelCard, schema_of
from tests.bundle._models import mlp


@pytest.fixture(scope="session")
def model() -> bytes:
    return mlp([8, 16, 3])[0]


@pytest.fixture
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def device() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def card_for(model: bytes, version: str = "1.0.0", **extra) -> ModelCard:
    inputs, outputs = schema_of(model)
    return ModelCard(name="mlp", version=version, inputs=inputs, outputs=outputs, **extra)
