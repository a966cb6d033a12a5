"""Attack: find a planted e-mail address in anything insitu wrote.

``simulate --label`` once turned an ``email`` column into 6,000 one-hot features, one per
address, and wrote the addresses in clear into ``models/<run>/features.json`` and every
site's ``prepared/*/manifest.json``. Here a canary address (``canary-<random>@example.org``)
is planted in a table, the table goes through every command that writes files
(``simulate --label``, ``simulate -s``, ``data prepare``, ``optimize``, ``bundle create``,
``report``), and every byte written is searched for it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import tomli_w

from insitu.cli import run
from insitu.data import DataSchema, read_table
from insitu.datasets import builtin_data, builtin_schema

pytestmark = [
    pytest.mark.slow,
    # Ray's leftovers (see conftest._collect_ray_leftovers), never insitu's own.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_planted_email_address_is_in_no_file_any_command_writes(tmp_path, capsys):
    canary = f"canary-{secrets.token_hex(8)}@example.org"
    frame = read_table(builtin_data("adult")).iloc[:6000].drop(columns=["record_id"])
    frame.insert(0, "email", [f"person{i}@example.org" for i in range(len(frame))])
    frame.loc[1234, "email"] = canary
    data = tmp_path / "patients.csv"
    frame.to_csv(data, index=False)
    doc = DataSchema.load(builtin_schema("adult")).source
    doc["dataset"].pop("subject")
    doc["identifiers"]["direct"] = ["email"]
    doc["treatment"]["drop"] = [*doc["treatment"]["drop"], "email"]
    doc["consent"] = {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"}
    schema = tmp_path / "patients.schema.toml"
    schema.write_text(tomli_w.dumps(doc))
    home = tmp_path / "coordinator"
    common = ["--sites", "3", "--rounds", "1", "--batch-size", "64", "--home", str(home)]

    assert _cli(capsys, "init", "--home", str(home))[0] == 0
    code, out, err = _cli(
        capsys, "federate", "simulate", "--data", str(data), "--label", "income", *common,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    labelled = json.loads(out)
    assert any("'email'" in w for w in labelled["warnings"])  # dropped, and said so
    assert sum("warning:" in line and "email" in line for line in err.splitlines()) == 1
    code, out, err = _cli(
        capsys, "federate", "simulate", "--data", str(data), "-s", str(schema), *common, "--json"
    )
    assert code == 0, err
    declared = json.loads(out)
    assert _cli(
        capsys, "data", "prepare", str(data), "-s", str(schema), "-o", str(tmp_path / "release"),
        "--suppress", "--home", str(home),
    )[0] == 0  # fmt: skip
    code, _, err = _cli(
        capsys, "optimize", declared["model_dir"], "--calibration", str(data), "--eval",
        str(data), "--out", str(tmp_path / "opt"), "--quick", "--home", str(home),
    )  # fmt: skip
    assert code in (0, 1), err  # 1: nothing beat fp32 (the report is written all the same)
    model = tmp_path / "opt" / "model.onnx"
    if not model.exists():
        model = Path(declared["model_dir"]) / "model.onnx"
    code, _, err = _cli(
        capsys, "bundle", "create", str(model), "--version", "1.0.0", "--name", "patients",
        "--out", str(tmp_path / "patients.insb"), "--home", str(home),
        "--recipient", str(home / "sites" / "site-01" / "keys" / "encryption.pub.pem"),
        "--epsilon", f"{declared['epsilon_run']:.6f}", "--delta", "1e-5",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = _cli(capsys, "report", str(home), "--out", str(tmp_path / "report.html"))
    assert code == 0, err

    needle = canary.encode()
    local = canary.split("@", 1)[0].encode()
    leaks = [
        str(path.relative_to(tmp_path))
        for path in tmp_path.rglob("*")
        if path.is_file()
        and path != data
        and (needle in (content := path.read_bytes()) or local in content)
    ]
    assert leaks == []
