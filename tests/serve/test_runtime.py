"""ModelRuntime: validation, verification on every load, budget, idle unloading, counting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.bundle import BundleVerifier, ModelCard, create_bundle, schema_of
from insitu.errors import BundleError, InvalidInputError, ModelNotFoundError
from insitu.runtime import BundleFile, InputSpec, ModelRuntime, predict_file
from insitu.runtime._usage import UsageCounter
from tests.bundle._models import mlp
from tests.serve.conftest import Site

SPEC = InputSpec("x", np.dtype(np.float32), (None, 8))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 20), bad=st.sampled_from([np.nan, np.inf, -np.inf]), at=st.integers(0, 159)
)
def test_any_nan_or_inf_is_refused(rows: int, bad: float, at: int) -> None:
    values = np.zeros((rows, 8), dtype=np.float32)
    np.testing.assert_array_equal(SPEC.check(values), values)
    values.flat[at % values.size] = bad
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        SPEC.check(values)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([[1.0] * 7], "axis 1 must have 8"),
        ([[[1.0] * 8]], "shape"),
        ([["a"] * 8], "text"),
        ([[1.0] * 8, [1.0]], "equal length"),
        (np.ones((2, 8), dtype=np.float64), "float64"),
        (np.ones((5000, 8), dtype=np.float32), "1 to 4096 rows"),
    ],
)
def test_inputs_that_do_not_fit_the_card_are_refused(value: object, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        SPEC.check(value)


def test_one_row_without_batch_axis_and_ints_are_accepted() -> None:
    assert SPEC.check([1] * 8).shape == (1, 8)
    assert SPEC.check(np.ones((2, 8), dtype=np.float64), cast=True).dtype == np.float32


def test_every_load_verifies_the_signature(site: Site) -> None:
    with ModelRuntime.for_workspace(site.workspace, idle_seconds=0.0) as runtime:
        assert runtime.predict("mlp", [[0.5] * 8])["y"].shape == (1, 1)
        assert runtime.unload_idle() == ["mlp"]
        slot = next((site.workspace.home / "update" / "slots").glob("*.insb"))
        data = bytearray(slot.read_bytes())
        data[-10] ^= 0xFF  # flip a payload byte: the AEAD tag / digest no longer match
        slot.write_bytes(bytes(data))
        with pytest.raises(BundleError):
            runtime.get("mlp")
    with site.workspace.ledger() as ledger:
        loads = ledger.entries(event_type="inference.loaded")
    assert len(loads) == 1
    assert loads[0].payload["signature_verified"] is True


def _bundle_file(tmp_path: Path, name: str, widths: list[int]) -> tuple[Path, BundleVerifier]:
    publisher, device = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    model = mlp(widths)[0]
    inputs, outputs = schema_of(model)
    card = ModelCard(name=name, version="1.0.0", inputs=inputs, outputs=outputs)
    path = tmp_path / f"{name}.insb"
    path.write_bytes(create_bundle(model, card, publisher, recipients=[device.public_key()]))
    return path, BundleVerifier([publisher.public_key()]), device  # type: ignore[return-value]


def test_memory_budget_unloads_least_recently_used(tmp_path: Path) -> None:
    sources = []
    for name in ("small", "other"):
        path, verifier, device = _bundle_file(tmp_path, name, [8, 64, 1])  # type: ignore[misc]
        sources.append(BundleFile(path, verifier=verifier, device_key=device))
    with ModelRuntime(sources, memory_budget=3000, guard=False) as runtime:
        runtime.get("small")
        assert set(runtime.loaded()) == {"small"}
        runtime.get("other")  # both do not fit: the least recently used goes
        assert set(runtime.loaded()) == {"other"}
        with pytest.raises(ModelNotFoundError, match="no model named 'third'"):
            runtime.get("third")


def test_observers_see_each_batch_and_cannot_break_it(site: Site) -> None:
    seen: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []

    def observer(name: str, version: str, inputs: np.ndarray, outputs: np.ndarray) -> None:
        seen.append((name, version, inputs.shape, outputs.shape))

    def broken(*_: object) -> None:
        raise RuntimeError("observer bug")

    with ModelRuntime.for_workspace(site.workspace, guard=False) as runtime:
        runtime.add_observer(broken)
        runtime.add_observer(observer)
        runtime.predict("mlp", np.zeros((3, 8)))
    assert seen == [("mlp", "1.0.0", (3, 8), (3, 1))]


def test_usage_is_counted_per_version_and_hour_without_data() -> None:
    records: list[tuple[str, dict[str, object]]] = []
    now = [3600.0 * 10 + 5]
    counter = UsageCounter(lambda t, p: records.append((t, p)), clock=lambda: now[0])
    counter.add("m", "1.0.0", requests=1, rows=4, errors=0)
    counter.add("m", "1.0.0", requests=1, rows=0, errors=1)
    assert counter.flush() == 0  # the hour is not over
    now[0] += 3600
    counter.add("m", "1.1.0", requests=1, rows=2, errors=0)
    assert counter.flush() == 1
    assert records[0][1] == {
        "model": "m",
        "version": "1.0.0",
        "hour": "1970-01-01T10:00:00Z",
        "requests": 2,
        "rows": 4,
        "errors": 1,
        "partial": False,
    }
    assert counter.flush(final=True) == 1
    assert records[1][1]["partial"] is True


def test_predict_file_streams_csv_and_parquet(site: Site, tmp_path: Path) -> None:
    rows = np.random.default_rng(0).random((1000, 8))
    frame = pd.DataFrame(rows, columns=[f"f{j}" for j in range(8)])
    frame.to_csv(tmp_path / "in.csv", index=False)
    frame.to_parquet(tmp_path / "in.parquet")
    with ModelRuntime.for_workspace(site.workspace, guard=False) as runtime:
        expected = runtime.predict("mlp", rows)["y"][:, 0]
        progress: list[int] = []
        done = predict_file(
            runtime,
            "mlp",
            tmp_path / "in.csv",
            tmp_path / "out.csv",
            chunk_rows=128,
            progress=progress.append,
        )
        assert done["rows"] == 1000
        assert done["chunks"] == 8
        assert progress[-1] == 1000
        predict_file(
            runtime, "mlp", tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=300
        )
        frame = frame.astype(object)
        frame.iloc[700, 3] = "oops"
        frame.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(InvalidInputError, match=r"rows 641-768|non-numeric"):
            predict_file(
                runtime, "mlp", tmp_path / "bad.csv", tmp_path / "bad-out.csv", chunk_rows=128
            )
    np.testing.assert_allclose(pd.read_csv(tmp_path / "out.csv")["y"], expected, rtol=1e-5)
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "out.parquet")["y"], expected, rtol=1e-6)
    assert not (tmp_path / "bad-out.csv").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_attack_symlinked_prediction_output(site: Site, tmp_path: Path) -> None:
    pd.DataFrame(np.zeros((3, 8))).to_csv(tmp_path / "in.csv", index=False)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    (tmp_path / "out.csv").symlink_to(outside)
    with (
        ModelRuntime.for_workspace(site.workspace, guard=False) as runtime,
        pytest.raises(OSError, match="symbolic link"),
    ):
        predict_file(runtime, "mlp", tmp_path / "in.csv", tmp_path / "out.csv")
    assert outside.read_bytes() == b"not yours"
    assert (tmp_path / "out.csv").is_symlink()
    assert not list(tmp_path.glob(".out.csv.*"))  # no temporary file left
