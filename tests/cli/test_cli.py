"""The ``insitu`` command: output, JSON, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import insitu
from insitu.cli import run
from tests.audit._tamper import raw


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def invoke_json(capsys, *args: str):
    code, out, err = invoke(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def home(tmp_path, capsys) -> str:
    path = str(tmp_path / "ws")
    code, _, err = invoke(capsys, "init", "--home", path, "--name", "ward-7")
    assert code == 0, err
    return path


def test_version(capsys):
    code, out, _ = invoke(capsys, "--version")
    assert code == 0
    assert out.strip() == f"insitu {insitu.__version__}"


def test_help_lists_the_verb_groups(capsys):
    code, out, _ = invoke(capsys, "--help")
    assert code == 0
    for word in ("quickstart", "init", "info", "audit"):
        assert word in out


def test_no_arguments_shows_help_with_usage_exit_code(capsys):
    code, out, err = invoke(capsys)
    assert code == 2
    assert "Usage" in out + err


def test_init_json_and_idempotence(tmp_path, capsys):
    path = str(tmp_path / "ws")
    first = invoke_json(capsys, "init", "--home", path)
    assert first["created"] is True
    assert first["ledger"]["entries"] == 1
    second = invoke_json(capsys, "init", "--home", path)
    assert second["created"] is False
    assert second["node_id"] == first["node_id"]


def test_info_json(home, capsys):
    info = invoke_json(capsys, "info", "--home", home)
    assert info["name"] == "ward-7"
    assert info["keys_encrypted"] is False


def test_audit_log_json_newest_first_and_filters(home, capsys):
    code, out, _ = invoke(capsys, "audit", "log", "--home", home)
    assert code == 0
    assert "workspace.init" in out
    entries = invoke_json(capsys, "audit", "log", "--home", home, "--type", "workspace.")
    assert [e["type"] for e in entries] == ["workspace.init"]
    assert invoke_json(capsys, "audit", "log", "--home", home, "--since", "2999-01-01") == []


def test_audit_verify_ok_and_tampered(home, capsys):
    report = invoke_json(capsys, "audit", "verify", "--home", home)
    assert report["ok"] is True
    assert report["entries"] == 1
    raw(Path(home) / "ledger.db").execute("UPDATE entries SET payload = '{}' WHERE seq = 1")
    code, out, err = invoke(capsys, "audit", "verify", "--home", home, "--json")
    assert code == 1
    assert json.loads(out) == {
        "ok": False,
        "first_bad_seq": 1,
        "error": "EntryHashMismatchError",
        "message": json.loads(out)["message"],
    }
    assert err.count("\n") == 1
    assert "first bad entry: 1" in err


def test_kept_head_export_and_offline_verification(home, tmp_path, capsys):
    head_file = tmp_path / "kept-head.json"
    assert invoke(capsys, "audit", "head", "--home", home, "--out", str(head_file))[0] == 0
    export_file = tmp_path / "ledger.jsonl"
    exported = invoke_json(capsys, "audit", "export", "--home", home, "--out", str(export_file))
    assert exported["entries"] >= 1
    pub = str(Path(home) / "keys" / "signing.pub.pem")
    result = invoke_json(
        capsys,
        "audit",
        "verify",
        "--export",
        str(export_file),
        "--public-key",
        pub,
        "--head",
        str(head_file),
    )
    assert result["ok"] is True
    # Without a pinned key, it verifies but warns.
    code, _, err = invoke(capsys, "audit", "verify", "--export", str(export_file))
    assert code == 0
    assert "pin it with --public-key" in err


def test_prove_and_check_proof(home, tmp_path, capsys):
    head_file = tmp_path / "kept-head.json"
    invoke(capsys, "audit", "head", "--home", home, "--out", str(head_file))
    run(["init", "--home", str(tmp_path / "unused")])  # unrelated node, other key
    capsys.readouterr()
    proof = tmp_path / "p.json"
    growth = tmp_path / "g.json"
    assert invoke(capsys, "audit", "prove", "1", "--home", home, "--out", str(proof))[0] == 0
    assert (
        invoke(
            capsys,
            "audit",
            "prove",
            "--grown-from",
            str(head_file),
            "--home",
            home,
            "-o",
            str(growth),
        )[0]
        == 0
    )
    pub = str(Path(home) / "keys" / "signing.pub.pem")
    assert (
        invoke_json(capsys, "audit", "check-proof", str(proof), "--public-key", pub)["kind"]
        == "inclusion"
    )
    assert (
        invoke_json(capsys, "audit", "check-proof", str(growth), "--public-key", pub)["kind"]
        == "consistency"
    )
    other_pub = str(tmp_path / "unused" / "keys" / "signing.pub.pem")
    code, _, err = invoke(capsys, "audit", "check-proof", str(proof), "--public-key", other_pub)
    assert code == 1
    assert "another key" in err


def test_prove_needs_exactly_one_target(home, capsys):
    code, _, err = invoke(capsys, "audit", "prove", "--home", home)
    assert code == 2
    assert "either an entry number" in err


def test_missing_workspace_is_one_line_and_exit_1(tmp_path, capsys):
    code, out, err = invoke(capsys, "audit", "log", "--home", str(tmp_path / "none"))
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: no insitu workspace")
    assert "Traceback" not in err


def test_corrupt_config_is_one_line_and_exit_1(home, capsys):
    (Path(home) / "config.toml").write_text("[[[")
    code, _, err = invoke(capsys, "info", "--home", home)
    assert code == 1
    assert err.count("\n") == 1
    assert "not valid TOML" in err


def test_wrong_passphrase_is_one_line_exit_1_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INSITU_PASSPHRASE", "right")
    path = str(tmp_path / "ws")
    invoke(capsys, "init", "--home", path)
    monkeypatch.setenv("INSITU_PASSPHRASE", "wrong")
    before = (Path(path) / "ledger.db").read_bytes()
    code, _, err = invoke(capsys, "audit", "head", "--home", path)
    assert code == 1
    assert err.count("\n") == 1
    assert "INSITU_PASSPHRASE does not open" in err
    assert (Path(path) / "ledger.db").read_bytes() == before


def test_unwritable_home_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = invoke(capsys, "init", "--home", str(tmp_path / "file" / "ws"))
    assert code == 1
    assert "writable --home" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_usage_error_exit_2(capsys):
    code, _, err = invoke(capsys, "audit", "log", "--limit", "0")
    assert code == 2
    assert "--limit" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = invoke(capsys, "--debug", "info", "--home", str(tmp_path / "none"))
    assert code == 1
    assert "Traceback" in err


def test_the_installed_entry_point_exits_with_the_error_code(tmp_path):
    exe = Path(sys.executable).parent / "insitu"
    result = subprocess.run(
        [str(exe), "info", "--home", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: no insitu workspace")
