"""``insitu data`` and ``insitu consent`` from the command line."""

from __future__ import annotations

import json

from insitu.cli import run
from tests.data.conftest import SCHEMA, make_patients


def invoke(capsys, *args):
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def setup(tmp_path, capsys):
    home = str(tmp_path / "ws")
    assert invoke(capsys, "init", "--home", home)[0] == 0
    data = tmp_path / "patients.csv"
    make_patients().to_csv(data, index=False)
    schema = tmp_path / "patients.schema.toml"
    schema.write_text(SCHEMA)
    return home, str(data), str(schema)


def test_inspect_json(tmp_path, capsys):
    _, data, schema = setup(tmp_path, capsys)
    code, out, _ = invoke(capsys, "data", "inspect", data, "--schema", schema, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["undeclared_excluded"] == ["notes"]
    assert doc["dropped"] == ["name", "ssn"]
    assert doc["warnings"] == []
    assert "email address" in doc["identifier_like_columns"]["email"]


def test_prepare_then_consent_flow(tmp_path, capsys):
    home, data, schema = setup(tmp_path, capsys)
    out_dir = str(tmp_path / "release")
    code, out, err = invoke(
        capsys, "data", "prepare", data, "-s", schema, "-o", out_dir, "--home", home, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["rows_out"] == 240
    consent = tmp_path / "consent.csv"
    consent.write_text(
        "subject,purpose,status\nRAWID-0001-Q,training,granted\nRAWID-0002-Q,training,granted\n"
    )
    code, out, _ = invoke(capsys, "consent", "import", str(consent), "--home", home, "--json")
    assert json.loads(out) == {"imported": 2, "granted": 2, "withdrawn": 0}
    assert (
        invoke(capsys, "consent", "withdraw", "RAWID-0002-Q", "-p", "training", "--home", home)[0]
        == 0
    )
    code, out, _ = invoke(capsys, "consent", "status", "--home", home, "--json")
    assert json.loads(out) == {"training": {"granted": 1, "withdrawn": 1}}
    code, out, _ = invoke(capsys, "consent", "status", "RAWID-0002-Q", "--home", home, "--json")
    doc = json.loads(out)
    assert doc["purposes"] == {"training": "withdrawn"}
    assert doc["subject"].startswith("p_")
    assert "RAWID" not in out


def test_release_below_k_exits_1_with_one_line(tmp_path, capsys):
    home, data, schema = setup(tmp_path, capsys)
    out_dir = tmp_path / "release"
    code, _, err = invoke(
        capsys,
        "data",
        "prepare",
        data,
        "-s",
        schema,
        "-o",
        str(out_dir),
        "--home",
        home,
        "--k",
        "61",
    )
    assert code == 1
    assert err.count("\n") == 1
    assert "--suppress" in err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_bad_schema_exits_1_naming_the_column(tmp_path, capsys):
    _, data, _ = setup(tmp_path, capsys)
    bad = tmp_path / "bad.toml"
    bad.write_text(SCHEMA.replace('keep = ["zip"]', 'keep = ["zip", "name"]'))
    code, _, err = invoke(capsys, "data", "inspect", data, "--schema", str(bad))
    assert code == 1
    assert "'name' is both dropped and kept" in err


def test_bad_consent_status_exits_1(tmp_path, capsys):
    home, _, _ = setup(tmp_path, capsys)
    consent = tmp_path / "consent.csv"
    consent.write_text("subject,purpose,status\nA,training,yes\n")
    code, _, err = invoke(capsys, "consent", "import", str(consent), "--home", home)
    assert code == 1
    assert "line 2" in err
