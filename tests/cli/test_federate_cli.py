"""``insitu federate simulate``: bad input is refused before anything starts."""

from __future__ import annotations

import pytest

from insitu.cli import run
from insitu.datasets import builtin_data

# The Adult rows insitu carries (the same as ../shared/data/adult.csv, plus record ids).
ADULT = builtin_data("adult")


@pytest.fixture
def home(tmp_path, capsys):
    path = tmp_path / "coord"
    assert run(["init", "--home", str(path)]) == 0
    capsys.readouterr()
    return path


def simulate(capsys, home, *args):
    code = run(["federate", "simulate", "--home", str(home), *args])
    err = capsys.readouterr().err
    return code, err


def test_label_missing_from_the_data(home, capsys, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,b\n1,2\n3,4\n")
    code, err = simulate(capsys, home, "--data", str(data), "--label", "income")
    assert code == 1
    assert "label column 'income' is not in the data" in err
    assert not (home / "sites").exists()


def test_a_column_the_schema_does_not_know(home, capsys, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,y\n1,0\n3,1\n")
    schema = tmp_path / "s.toml"
    schema.write_text(
        '[dataset]\nlabel = "y"\n[features]\nnumeric = ["a", "b"]\n'
        '[consent]\nrequired = false\nlegal_basis = "test"\n'
    )
    code, err = simulate(capsys, home, "--data", str(data), "--schema", str(schema))
    assert code == 1
    assert "column 'b' is declared in the schema but is not in d.csv" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilon", "0"], "--epsilon 0.0: use a value from 0.01 to 100"),
        (["--epsilon", "1000"], "--epsilon 1000.0"),
        (["--delta", "0.5"], "--delta 0.5"),
        (["--partition", "weird"], "--partition 'weird'"),
        (["--robust", "median"], "pass --no-secure-aggregation with --robust"),
    ],
)
def test_out_of_range_settings_are_usage_errors(home, capsys, args, message):
    code, err = simulate(capsys, home, "--data", str(ADULT), "--label", "income", *args)
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0


def test_a_site_too_small_for_the_epsilon_names_the_smallest_workable_size(home, capsys):
    code, err = simulate(
        capsys,
        home,
        "--data",
        str(ADULT),
        "--label",
        "income",
        "--sites",
        "200",
        "--rounds",
        "50",
        "--epsilon",
        "0.1",
    )
    assert code == 1
    assert "needs at least" in err
    assert "per site" in err
    assert not (home / "sites").exists()
