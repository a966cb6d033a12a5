"""The report of an image run: digits, a CNN, 2 sites, 1 round, a drift reference and drift.

The run is a real ``insitu federate simulate`` of digits; the drift reference is then
released at its two sites (charged to their subjects, naming the run), the model bundled
with it, and one site's monitor sees inverted digits. The report must describe images
(shape, channels, classes, range: from the verified model and schema), not 64 table
columns, and show the drift statistics from the ledgers.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from insitu.cli import run
from insitu.drift import DriftMonitor, ProfileLayout, combine_releases, release_profile
from insitu.report import build_report, render_html
from insitu.workspace import Workspace


@dataclass
class ImageRun:
    home: Path
    run: str
    html: str
    sections: dict[str, object]


def _text(html: str) -> str:
    html = re.sub(r"<svg.*?</svg>", " ", html, flags=re.DOTALL)
    html = re.sub(r"<style.*?</style>", " ", html, flags=re.DOTALL)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _simulate(directory: Path) -> tuple[Path, dict[str, object]]:
    from insitu.datasets import write_digits

    data, schema = write_digits(directory)
    home = directory / "coord"
    buffer = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.simplefilter("ignore", pytest.PytestUnraisableExceptionWarning)
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
            assert run(["init", "--home", str(home)]) == 0
            buffer.truncate(0)
            buffer.seek(0)
            code = run(
                [
                    "federate", "simulate", "--home", str(home), "--data", str(data),
                    "-s", str(schema), "--model", "cnn", "--sites", "2", "--rounds", "1",
                    "--epsilon", "8", "--batch-size", "64", "--learning-rate", "2",
                    "--server-optimizer", "fedavg", "--no-secure-aggregation", "--json",
                ]
            )  # fmt: skip
        gc.collect()
    assert code == 0, buffer.getvalue()[-2000:]
    return home, json.loads(buffer.getvalue())


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> ImageRun:
    from insitu._ort import create_session
    from insitu.bundle import bundle_model
    from insitu.data import ArraySchema

    directory = tmp_path_factory.mktemp("digits-report")
    home, result = _simulate(directory)
    run_id = str(result["run"]) if "run" in result else Path(str(result["model_dir"])).name
    onnx = (Path(str(result["model_dir"])) / "model.onnx").read_bytes()
    session = create_session(onnx, intra_op_threads=1)
    images = np.load(directory / "digits.npz")["x"].astype(np.float32)
    layout = ProfileLayout.from_schema(
        ArraySchema.load(directory / "digits.schema.toml"), output_classes=10
    )
    releases = []
    for index, site in enumerate(sorted((home / "sites").iterdir())):
        mine = images[index::2]
        releases.append(
            release_profile(
                Workspace.open(site),
                layout,
                mine,
                session.run(None, {"features": mine})[0],
                subject_keys=np.arange(len(mine), dtype=np.uint64) + np.uint64(1),
                dataset="digits",
                epsilon=2.0,
                run=run_id,
            )
        )
    profile = combine_releases(layout, releases)
    bundle_model(
        Workspace.open(home), onnx, name="digits", version="1.0.0", encrypt=False,
        epsilon=8.0, delta=1e-5, drift_reference=profile.to_json(),
    )  # fmt: skip
    # One site serves the model and sees inverted digits.
    monitor = DriftMonitor(Workspace.open(home / "sites" / "site-01"))
    monitor.register("digits", "1.0.0", profile)
    inverted = 16.0 - images
    monitor.on_batch("digits", "1.0.0", inverted, session.run(None, {"features": inverted})[0])
    monitor.check()
    report = build_report([home])
    return ImageRun(home, run_id, render_html(report), report.sections)


def test_the_data_section_names_the_images_not_their_values_as_columns(
    image_run: ImageRun,
) -> None:
    text = _text(image_run.html)
    assert "records: images of 1 channel(s) x 8 x 8 (64 values each, declared range [0, 16])" in (
        text
    )
    assert "10 classes" in text
    assert "x_0, x_1" not in text  # the table underneath is not shown as 64 features
    assert "(numeric); (categorical)" not in text
    arrays = image_run.sections["arrays"]
    assert isinstance(arrays, dict)
    assert arrays["shape"] == [1, 8, 8]
    assert arrays["consistent"]
    assert arrays["per_class_accuracy"] is None
    assert "accuracy per class not released" in text


def test_the_drift_reference_and_the_flagged_statistics_are_shown(image_run: ImageRun) -> None:
    text = _text(image_run.html)
    drift = image_run.sections["drift"]
    assert isinstance(drift, dict)
    assert [r["site"] for r in drift["releases"]] == ["site-01", "site-02"]
    assert all(r["epsilon"] == 2.0 for r in drift["releases"])
    flagged = {f["feature"] for f in drift["flagged"]}
    assert {"c0_mean", "c0_at_min", "c0_at_max"} <= flagged
    assert all(f["site"] == "site-01" and f["version"] == "1.0.0" for f in drift["flagged"])
    assert "Drift on image statistics" in text
    assert "drift.detected" in text
    assert "c0_mean" in text
    assert drift["plot"] is not None
    assert drift["plot"].startswith("<svg")


def test_the_drift_reference_is_charged_in_the_privacy_section(image_run: ImageRun) -> None:
    privacy = image_run.sections["privacy"]
    assert isinstance(privacy, list)
    for site in privacy:
        assert "drift-reference-histograms" in site["mechanisms"]
        assert site["rounds_charged"] == 1  # the release is not counted as a training round
