"""Array data sets (images, signals) under an array schema, as tables are under theirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from insitu.cli import run
from insitu.data import (
    SUBJECT_COLUMN,
    ArraySchema,
    ConsentRegistry,
    Pseudonymizer,
    SiteDataset,
    array_table,
    load_schema,
)
from insitu.datasets import DIGITS_SCHEMA, write_digits
from insitu.errors import DataFormatError, SchemaError
from insitu.workspace import Workspace

SIGNALS = """\
[dataset]
name = "beats"
kind = "signals"
label = "rhythm"
subject = "patient"

[arrays]
x = "ecg"
shape = [2, 32]
value_range = [-5, 5]
label_names = ["normal", "irregular"]

[consent]
purpose = "training"
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_digits(tmp_path_factory.mktemp("digits"))


def signals(tmp_path: Path, *, extra: bool = True) -> tuple[Path, Path]:
    """Synthetic two-lead signals of 6 patients (3 records each), and their schema."""
    rng = np.random.default_rng(0)
    arrays = {
        "ecg": rng.normal(size=(18, 2, 32)).clip(-4, 4).astype(np.float32),
        "rhythm": np.array(["normal", "irregular"] * 9),
        "patient": np.repeat([f"patient-{i}" for i in range(6)], 3),
    }
    if extra:
        arrays["names"] = np.array([f"Person {i}" for i in range(18)])
    data, schema = tmp_path / "beats.npz", tmp_path / "beats.schema.toml"
    np.savez(data, **arrays)
    schema.write_text(SIGNALS)
    return data, schema


def test_digits_npz_reads_as_a_table_of_the_declared_values(digits: tuple[Path, Path]) -> None:
    table = array_table(digits[0], ArraySchema.load(digits[1]))
    assert table.frame.shape == (1797, 64 + 1)
    assert table.schema.numeric == tuple(f"x_{i}" for i in range(64))
    assert table.schema.ranges["x_0"] == (0.0, 16.0)
    assert sorted(table.frame["y"].unique()) == [str(i) for i in range(10)]
    assert table.undeclared == []
    assert table.outside_range == 0


def test_load_schema_tells_an_array_schema_from_a_table_schema(
    digits: tuple[Path, Path], tmp_path: Path
) -> None:
    assert isinstance(load_schema(digits[1]), ArraySchema)
    table = tmp_path / "t.toml"
    table.write_text('[dataset]\nlabel = "y"\n[consent]\nrequired = false\nlegal_basis = "x"\n')
    assert not isinstance(load_schema(table), ArraySchema)


def test_records_of_another_shape_than_declared_are_refused(
    digits: tuple[Path, Path], tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(DIGITS_SCHEMA.replace("shape = [1, 8, 8]", "shape = [1, 28, 28]"))
    with pytest.raises(SchemaError, match=r"have shape \(1, 8, 8\), the schema declares \(1, 28"):
        array_table(digits[0], ArraySchema.load(wrong))


def test_site_refuses_images_whose_declared_shape_does_not_match_in_one_line(
    digits: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "site")
    assert run(["init", "--home", home]) == 0
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(DIGITS_SCHEMA.replace("shape = [1, 8, 8]", "shape = [3, 8, 8]"))
    capsys.readouterr()
    out = tmp_path / "release"
    code = run(
        ["data", "prepare", str(digits[0]), "-s", str(wrong), "-o", str(out), "--home", home]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "the schema declares (3, 8, 8)" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_digits_prepare_from_the_command_line_seals_the_declared_values(
    digits: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "site")
    assert run(["init", "--home", home]) == 0
    out = tmp_path / "release"
    args = ["data", "prepare", str(digits[0]), "-s", str(digits[1]), "-o", str(out)]
    capsys.readouterr()
    assert run([*args, "--home", home, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_out"] == 1797
    assert report["columns"] == [*(f"x_{i}" for i in range(64)), "y"]


def test_attack_undeclared_array_never_reaches_the_release(
    workspace: Workspace, tmp_path: Path
) -> None:
    data, schema = signals(tmp_path)
    table = array_table(data, ArraySchema.load(schema))
    assert table.undeclared == ["names"]
    dataset = SiteDataset.from_frame(workspace, table.frame, table.schema, source=data.name, k=1)
    released = dataset.prepared.frame
    assert "names" not in released.columns
    assert "patient" in released.columns
    assert not released["patient"].str.startswith("patient-").any()  # pseudonymized
    assert not released.astype(str).isin([f"Person {i}" for i in range(18)]).any().any()


def test_consent_and_budgets_follow_the_subject_array(workspace: Workspace, tmp_path: Path) -> None:
    data, schema = signals(tmp_path)
    table = array_table(data, ArraySchema.load(schema))
    dataset = SiteDataset.from_frame(workspace, table.frame, table.schema, source=data.name, k=1)
    with workspace.ledger() as ledger:
        registry = ConsentRegistry(ledger, Pseudonymizer(workspace.secret("pseudonym")))
        registry.change_many([("patient-0", "training", "granted")])
        registry.change_many([("patient-1", "training", "granted")])
    round_data = dataset.for_round(round_number=1)
    assert round_data.rows == 6
    assert round_data.excluded_without_consent == 12
    assert round_data.subjects == 2  # one budget per patient, not per record
    assert round_data.features.shape == (6, 64)
    assert float(round_data.features.min()) >= 0.0
    assert float(round_data.features.max()) <= 1.0
    assert SUBJECT_COLUMN in dataset.prepared.frame.columns


def test_labels_outside_the_declared_classes_are_refused(tmp_path: Path) -> None:
    data, schema = signals(tmp_path)
    arrays = dict(np.load(data))
    arrays["rhythm"][0] = "flutter"
    np.savez(data, **arrays)
    with pytest.raises(SchemaError, match=r"1 labels are not among the 2 declared classes"):
        array_table(data, ArraySchema.load(schema))


def test_values_outside_the_declared_range_are_counted(tmp_path: Path) -> None:
    data, schema = signals(tmp_path)
    arrays = dict(np.load(data))
    arrays["ecg"][0, 0, :3] = 9.0
    np.savez(data, **arrays)
    assert array_table(data, ArraySchema.load(schema)).outside_range == 3


def test_a_missing_declared_array_is_named(tmp_path: Path) -> None:
    data, schema = signals(tmp_path)
    np.savez(data, ecg=np.zeros((2, 2, 32)), rhythm=np.array(["normal", "normal"]))
    with pytest.raises(DataFormatError, match=r"has no array 'patient'"):
        array_table(data, ArraySchema.load(schema))


def test_a_folder_of_images_gives_one_class_per_subfolder(tmp_path: Path) -> None:
    from PIL import Image

    for name, value in (("ok", 10), ("defect", 200)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 5), value + i, np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    schema = ArraySchema.from_dict(
        {
            "dataset": {"name": "line", "kind": "images", "label": "y"},
            "arrays": {
                "shape": [1, 6, 5],
                "value_range": [0, 255],
                "label_names": ["ok", "defect"],
            },
            "consent": {"required": False, "legal_basis": "test"},
        }
    )
    table = array_table(tmp_path / "images", schema)
    assert table.frame.shape == (6, 31)
    assert table.schema.positive == "1"  # two classes: the second is the positive one
    assert sorted(table.frame["y"]) == ["0"] * 3 + ["1"] * 3
    assert set(table.frame.loc[table.frame["y"] == "1", "x_0"]) == {200.0, 201.0, 202.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('kind = "images"', 'kind = "video"'), r"dataset.kind must be 'images' or 'signals'"),
        (("shape = [1, 8, 8]", "shape = [8, 8]"), r"arrays.shape of images is 3 positive"),
        (("value_range = [0, 16]", "value_range = [16, 0]"), r"low must be below high"),
        (('label_names = ["0", "1", "2"', 'label_names = ["0", "0", "2"'), r"a class twice"),
    ],
)
def test_an_invalid_array_schema_names_the_key(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(DIGITS_SCHEMA.replace(*change))
    with pytest.raises(SchemaError, match=message):
        ArraySchema.load(path)


def test_an_uint8_npz_is_read_without_a_schema(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    np.savez(path, x=np.zeros((4, 1, 3, 3), np.uint8), y=np.array([0, 1, 2, 1]))
    table = array_table(path, label="y")
    assert table.arrays.value_range == (0.0, 255.0)
    assert table.arrays.label_names == ("0", "1", "2")
    np.savez(path, x=np.zeros((4, 1, 3, 3), np.float32), y=np.array([0, 1, 2, 1]))
    with pytest.raises(SchemaError, match=r"write an array schema with arrays.value_range"):
        array_table(path, label="y")
