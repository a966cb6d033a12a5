"""A device with an Adult model installed through the real supply chain (TUF on loopback)."""

from __future__ import annotations

import hashlib
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from insitu.bundle import bundle_model
from insitu.data import ConsentRegistry, DataSchema, FeatureEncoder, Pseudonymizer, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.drift import ProfileLayout, combine_releases, noisy_release
from insitu.training import build_model, export_onnx
from insitu.update import UpdateClient, init_directory_repository
from insitu.update._serve import make_server
from insitu.workspace import Workspace

NAME = "adult-income"


@dataclass
class Device:
    home: Path
    data: Path  # the site's labelled local records (CSV)
    schema: DataSchema
    base: Path  # also holds coordinator/ and repository/

    def workspace(self) -> Workspace:
        return Workspace.open(self.home)

    def client(self) -> UpdateClient:
        ws = self.workspace()
        return UpdateClient(
            ws.home / "update",
            device_key=ws.encryption_key(),
            local_publisher=ws.signing_public_key,
        )

    def state(self) -> bytes:
        return (self.home / "update" / "slots" / "state.json").read_bytes()

    def copy(self, target: Path) -> Device:
        for part in ("device", "coordinator", "repository"):
            shutil.copytree(self.base / part, target / part)
        shutil.copy(self.data, target / "local.csv")
        return Device(target / "device", target / "local.csv", self.schema, target)


def weak_model(n_features: int) -> torch.nn.Module:
    """Predicts the majority class (<=50K) for everyone."""
    model = build_model("logistic", n_features)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
    return model


def build_device(base: Path, model_fn=weak_model, *, rows: int = 4000) -> Device:
    """Coordinator publishes ``model_fn``'s model with a DP profile; the device installs it."""
    schema = DataSchema.load(builtin_schema("adult"))
    frame = read_table(builtin_data("adult")).sample(n=rows + 3000, random_state=3)
    reference, local = frame.iloc[3000:], frame.iloc[:rows]
    encoder = FeatureEncoder.for_schema(schema)
    layout = ProfileLayout.from_schema(schema)
    release, _ = noisy_release(layout, encoder.encode(reference), None, epsilon=1.0, delta=1e-5)
    profile = combine_releases(layout, [release], schema=schema.source)

    coordinator, _ = Workspace.init(base / "coordinator", name="coordinator")
    device, _ = Workspace.init(base / "device", name="device")
    model = model_fn(layout.n_inputs)
    onnx = export_onnx(model, layout.n_inputs)
    with coordinator.ledger() as ledger:  # the coordinator's record of the private training
        ledger.record(
            "federation.completed",
            run="run-1",
            rounds=1,
            onnx_sha256=hashlib.sha256(onnx).hexdigest(),
            epsilon_run=1.0,
            delta=1e-5,
            round_entries=[],
        )
    blob, _ = bundle_model(
        coordinator,
        onnx,
        name=NAME,
        version="1.0.0",
        recipients=[device.encryption_public_key],
        metrics={"accuracy": 0.76},
        epsilon=1.0,
        delta=1e-5,
        data_schema_sha256=schema.digest(),
        drift_reference=profile.to_json(),
    )
    repo_dir = base / "repository"
    repository = init_directory_repository(repo_dir, publishers=[coordinator.signing_public_key])
    with coordinator.ledger() as ledger:
        repository.publish(
            blob,
            channels=["stable"],
            devices=[],
            publisher_key=coordinator.encryption_key(),
            max_deltas=0,
            ledger=ledger,
        )
    server = make_server(repo_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        root = (repo_dir / "public" / "metadata" / "1.root.json").read_bytes()
        UpdateClient.enroll(device.home / "update", root=root, url=url, model=NAME)
        with device.ledger() as ledger:
            UpdateClient(
                device.home / "update", device_key=device.encryption_key(), ledger=ledger
            ).update()
    finally:
        server.shutdown()
        server.server_close()
    with device.ledger() as ledger:
        registry = ConsentRegistry(ledger, Pseudonymizer(device.secret("pseudonym")))
        registry.change_many([(str(s), "training", "granted") for s in local[schema.subject or ""]])
    data = base / "local.csv"
    local.to_csv(data, index=False)
    return Device(device.home, data, schema, base)


def prepared_holdout(device: Device, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split finetune uses: the local file prepared under the schema."""
    from insitu.data import SiteDataset
    from insitu.finetune import split_holdout

    frame = read_table(device.data)
    local = SiteDataset.from_frame(
        device.workspace(), frame, device.schema, source="test", k=1
    ).for_round()
    _, held = split_holdout(local.labels, fraction=0.3, seed=seed)
    return local.features[held], local.labels[held]


def accuracy_of_active(device: Device, held: tuple[np.ndarray, np.ndarray]) -> float:
    """Accuracy of the active slot's model, as the runtime loads it, on ``held``."""
    _, session = device.client().session()
    logits = session.run(None, {"features": held[0]})[0].reshape(-1)
    return float(np.mean((logits > 0).astype(np.int64) == held[1]))
