"""Drift on image statistics: digits against their DP reference, and digits altered on purpose.

The reference is released by three sites (600 digits each) under DP, charged to their
subjects as a table's is. At epsilon 4 the noisy reference's largest PSI against the
same digits is about 0.05 (0.10 at the 99th percentile over 300 releases), far under the
0.2 threshold; at epsilon 1 the same data flags in 71% of releases (docs/arrays.md).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from insitu.data import ArraySchema
from insitu.drift import (
    OUTPUT,
    DriftMonitor,
    ProfileLayout,
    ReferenceProfile,
    bin_counts,
    combine_releases,
    release_profile,
)
from insitu.errors import SchemaError
from insitu.workspace import Workspace

EPSILON = 4.0
DIGITS_SCHEMA = {
    "dataset": {"name": "digits", "kind": "images", "label": "y"},
    "arrays": {
        "x": "x",
        "shape": [1, 8, 8],
        "value_range": [0, 16],
        "label_names": [str(i) for i in range(10)],
    },
    "consent": {"required": False, "legal_basis": "public data set"},
}
#: What inverting a digit moves: its mean, both saturations and every quadrant's mean
#: (its spread and gradient are symmetric under inversion and do not move).
MOVED_BY_INVERSION = {
    "c0_mean",
    "c0_at_min",
    "c0_at_max",
    "top_left_mean",
    "top_right_mean",
    "bottom_left_mean",
    "bottom_right_mean",
}


@dataclass
class DigitsSetup:
    images: np.ndarray
    onnx: bytes
    layout: ProfileLayout
    profile: ReferenceProfile
    sites: list[Workspace]

    def outputs(self, images: np.ndarray) -> np.ndarray:
        from insitu._ort import create_session

        session = create_session(self.onnx, intra_op_threads=1)
        logits: np.ndarray = session.run(None, {"features": images})[0]
        return logits


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsSetup:
    """An (untrained) CNN of digits and the reference its three sites released under DP."""
    import torch
    from sklearn.datasets import load_digits

    from insitu.training import ArrayModelFn, export_array_onnx

    images = load_digits().images[:, None].astype(np.float32)
    torch.manual_seed(0)
    onnx, _ = export_array_onnx(ArrayModelFn((1, 8, 8), 10)(64), (1, 8, 8), (0.0, 16.0))
    setup = DigitsSetup(images, onnx, None, None, [])  # type: ignore[arg-type]
    schema = ArraySchema.from_dict(DIGITS_SCHEMA)
    layout = ProfileLayout.from_schema(schema, output_classes=10)
    base = tmp_path_factory.mktemp("image-sites")
    releases = []
    for index in range(3):
        ws, _ = Workspace.init(base / f"site-{index}", name=f"site-{index}")
        mine = images[index::3]
        releases.append(
            release_profile(
                ws,
                layout,
                mine,
                setup.outputs(mine),
                subject_keys=np.arange(len(mine), dtype=np.uint64) + np.uint64(1),
                dataset="digits",
                epsilon=EPSILON,
                run="run-1",
            )
        )
        setup.sites.append(ws)
    setup.layout = layout
    setup.profile = combine_releases(layout, releases)
    return setup


def _feed(monitor: DriftMonitor, setup: DigitsSetup, images: np.ndarray) -> dict[str, bool]:
    monitor.register("digits", "1.0.0", setup.profile)
    for start in range(0, len(images), 256):
        batch = images[start : start + 256]
        monitor.on_batch("digits", "1.0.0", batch, setup.outputs(batch))
    return {f.feature: f.flagged for f in monitor.check("digits", "1.0.0")}


def test_image_statistics_come_from_the_declared_range_in_either_form(
    digits: DigitsSetup,
) -> None:
    names = [f["name"] for f in digits.layout.features]
    assert names == [
        *("c0_mean", "c0_std", "c0_at_min", "c0_at_max"),
        *(f"{q}_mean" for q in ("top_left", "top_right", "bottom_left", "bottom_right")),
        "gradient",
    ]
    ranges = {f["name"]: f["range"] for f in digits.layout.features}
    assert ranges["c0_mean"] == [0.0, 16.0]
    assert ranges["c0_std"] == [0.0, 8.0]
    assert ranges["gradient"] == [0.0, 16.0]
    assert digits.layout.bin_labels("c0_mean")[:2] == ["0-1.6", "1.6-3.2"]
    # The model's input (raw, declared range) and the table rows underneath (encoded to
    # [0, 1]) are counted alike.
    raw = bin_counts(digits.layout, digits.images, None)
    encoded = bin_counts(digits.layout, digits.images.reshape(-1, 64) / 16.0, None)
    assert all(np.array_equal(raw[n], encoded[n]) for n in raw)
    assert all(v.sum() == len(digits.images) for v in raw.values())
    # The layout travels in the card and back.
    again = ReferenceProfile.from_json(json.loads(json.dumps(digits.profile.to_json())))
    assert again == digits.profile
    assert again.layout.records == {"kind": "images", "shape": [1, 8, 8], "value_range": [0, 16]}


def test_records_of_another_shape_are_refused_naming_both(digits: DigitsSetup) -> None:
    with pytest.raises(
        SchemaError, match=r"records of shape \(1, 28, 28\) do not match .*\(1, 8, 8\)"
    ):
        bin_counts(digits.layout, np.zeros((2, 1, 28, 28), np.float32), None)


def test_a_profile_whose_records_do_not_give_its_statistics_is_refused(
    digits: DigitsSetup,
) -> None:
    doc = json.loads(json.dumps(digits.profile.to_json()))
    doc["layout"]["records"]["shape"] = [3, 8, 8]  # three channels: other statistics
    with pytest.raises(SchemaError, match=r"records .* do not give its statistics"):
        ReferenceProfile.from_json(doc)
    doc["layout"]["records"] = {"kind": "images", "shape": [1, 8, 8], "value_range": [16, 0]}
    with pytest.raises(SchemaError, match=r"make the profile again"):
        ReferenceProfile.from_json(doc)


def test_digits_against_their_reference_flag_nothing(
    digits: DigitsSetup, workspace: Workspace
) -> None:
    flagged = _feed(DriftMonitor(workspace), digits, digits.images)
    assert set(flagged) == {f["name"] for f in digits.layout.features} | {OUTPUT}
    assert not any(flagged.values())
    with workspace.ledger() as ledger:
        assert not ledger.entries(event_type="drift.detected")


def test_inverted_digits_flag_the_statistics_inversion_moves(
    digits: DigitsSetup, workspace: Workspace
) -> None:
    flagged = _feed(DriftMonitor(workspace), digits, 16.0 - digits.images)
    assert {f for f, yes in flagged.items() if yes and f != OUTPUT} == MOVED_BY_INVERSION
    with workspace.ledger() as ledger:
        detected = [e.payload for e in ledger.entries(event_type="drift.detected")]
    named = {p["feature"] for p in detected}
    assert named >= MOVED_BY_INVERSION
    mean = next(p for p in detected if p["feature"] == "c0_mean")
    assert mean["psi"] > 1.0
    assert mean["p_value"] < 1e-6
    assert mean["rows"] >= 1000  # flagged at the first check (every 1,000 rows)


def test_brightened_digits_flag_their_mean_and_saturation(
    digits: DigitsSetup, workspace: Workspace
) -> None:
    brighter = np.clip(digits.images + 4.0, 0.0, 16.0)
    flagged = _feed(DriftMonitor(workspace), digits, brighter)
    assert flagged["c0_mean"]
    assert flagged["c0_at_min"]  # the black background is gone
    assert flagged["c0_at_max"]


def test_the_image_reference_is_charged_to_each_sites_subjects(digits: DigitsSetup) -> None:
    for site in digits.sites:
        with site.ledger() as ledger:
            spent = [e.payload for e in ledger.entries(event_type="privacy.spent")]
            released = [e.payload for e in ledger.entries(event_type="drift.profile_released")]
        assert [p["mechanism"] for p in spent] == ["drift-reference-histograms"]
        assert EPSILON * 0.99 < spent[0]["epsilon_max_after"] <= EPSILON
        assert released[0]["histograms"] == len(digits.layout.features) + 1  # and the output
        assert released[0]["run"] == "run-1"


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_served_image_model_counts_requests_and_flags_drift(
    digits: DigitsSetup, tmp_path: Path
) -> None:
    from insitu.bundle import ModelCard, create_bundle, schema_of
    from insitu.serve import running
    from tests.serve.conftest import make_site

    site = make_site(tmp_path / "site", digits.onnx, name="digits")
    inputs, outputs = schema_of(digits.onnx)
    card = ModelCard("digits", "1.1.0", inputs, outputs, drift_reference=digits.profile.to_json())
    recipients = [site.workspace.encryption_public_key, site.publisher_enc.public_key()]
    blob = create_bundle(digits.onnx, card, site.publisher, recipients=recipients)
    site.sim.repo.publish(blob, publisher_key=site.publisher_enc)
    assert site.update()["installed"] == "1.1.0"
    inverted = 16.0 - digits.images
    with (
        running(site.workspace) as srv,
        httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http,
    ):
        for start in range(0, len(inverted), 300):
            buffer = io.BytesIO()
            np.save(buffer, inverted[start : start + 300])
            response = http.post(
                "/v1/models/digits/predict",
                content=buffer.getvalue(),
                headers={"content-type": "application/x-npy"},
            )
            assert response.status_code == 200, response.text
    state = json.loads((site.workspace.drift_dir / "digits@1.1.0.json").read_text())
    assert state["rows"] == len(inverted)
    assert all(sum(v) == len(inverted) for v in state["counts"].values())
    with site.workspace.ledger() as ledger:
        detected = {e.payload["feature"] for e in ledger.entries(event_type="drift.detected")}
    assert detected >= MOVED_BY_INVERSION
