"""The reference profile from the command line: two sites release, the coordinator combines."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from insitu.bundle import Bundle
from insitu.cli import run
from insitu.data import read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.drift import ReferenceProfile
from insitu.training import build_model, export_onnx
from tests._adult import N_INPUTS


def test_sites_release_the_coordinator_combines_and_the_card_carries_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = str(builtin_schema("adult"))
    frame = read_table(builtin_data("adult")).iloc[:4000]
    model = tmp_path / "model.onnx"
    model.write_bytes(export_onnx(build_model("logistic", N_INPUTS), N_INPUTS))
    releases = []
    for index, part in enumerate((frame.iloc[:2000], frame.iloc[2000:])):
        home = tmp_path / f"site-{index}"
        assert run(["init", "--home", str(home)]) == 0
        data = tmp_path / f"site-{index}.csv"
        part.to_csv(data, index=False)
        consents = tmp_path / f"consent-{index}.csv"
        pd.DataFrame(
            {"subject": part["record_id"], "purpose": "training", "status": "granted"}
        ).to_csv(consents, index=False)
        assert run(["consent", "import", str(consents), "--home", str(home)]) == 0
        out = tmp_path / f"release-{index}.json"
        args = ["drift", "release", "--data", str(data), "-s", schema, "--out", str(out)]
        assert run([*args, "--model", str(model), "--epsilon", "0.5", "--home", str(home)]) == 0
        releases.append(str(out))
    profile = tmp_path / "profile.json"
    assert run(["drift", "combine", *releases, "-s", schema, "--out", str(profile)]) == 0
    doc = json.loads(profile.read_text())
    reference = ReferenceProfile.from_json(doc)
    assert reference.sites == 2
    assert sum(reference.counts["age"]) == pytest.approx(4000, abs=300)  # noisy counts
    assert "(output)" in reference.counts
    coordinator = tmp_path / "coordinator"
    assert run(["init", "--home", str(coordinator)]) == 0
    bundle_path = tmp_path / "m.insb"
    args = ["bundle", "create", str(model), "--version", "1.0.0", "--out", str(bundle_path)]
    args += ["--no-encrypt", "--drift-reference", str(profile), "--home", str(coordinator)]
    assert run(args) == 0
    card = Bundle.parse(bundle_path.read_bytes()).card
    assert card.drift_reference == doc
    # No raw value in a release: only rounded noisy counts, never a row.
    text = Path(releases[0]).read_text()
    assert str(frame["record_id"].iloc[0]) not in text
    capsys.readouterr()
