"""Attacks by someone who can create files where insitu writes: links planted at outputs.

The attacker cannot read the node's keys but can create files in the folder an export,
a report or a key is written to, and plants a symbolic link to a file of theirs, or of
the victim's (``~/.bashrc``), hoping insitu writes through it. Each test plants a link
to a file outside, runs the command, and checks that the command refused in one line
(exit 1) and that the outside file's bytes and the link itself are unchanged. A link at
the *temporary* name is never even noticed: temporary files have unpredictable names
and are created with ``O_EXCL``, which does not follow links.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from insitu._atomic import atomic_create_bytes, open_no_follow
from insitu._sealed import write_sealed
from insitu.audit import events, verify_export
from insitu.cli import run
from insitu.workspace import Workspace

PRECIOUS = b"the victim's file, which no insitu command may change\n"
REFUSED = "it is a symbolic link, and insitu never writes through or over one"


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "ws"
    assert run(["init", "--home", str(path)]) == 0
    capsys.readouterr()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside every insitu folder: what the planted links point to."""
    victim = tmp_path / "victim" / "precious.txt"
    victim.parent.mkdir()
    victim.write_bytes(PRECIOUS)
    return victim


def plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def assert_refused_and_untouched(
    code: int, err: str, link: Path, outside: Path, *, exists: bool = True
) -> None:
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith(f"error: cannot use {link}: {REFUSED}")
    assert link.is_symlink()
    assert link.readlink() == outside
    if exists:
        assert outside.read_bytes() == PRECIOUS
    else:
        assert not outside.exists()


# -- links at the final path: refused -------------------------------------------------


def test_attack_link_at_the_audit_export_target(home, outside, tmp_path, capsys):
    link = plant(tmp_path / "out" / "ledger.jsonl", outside)
    code, out, err = invoke(capsys, "audit", "export", "--home", str(home), "--out", str(link))
    assert out == ""
    assert_refused_and_untouched(code, err, link, outside)
    assert [p.name for p in link.parent.iterdir()] == ["ledger.jsonl"]  # no temporary left


def test_attack_dangling_link_at_the_audit_export_target(home, tmp_path, capsys):
    # The link points to a file that does not exist yet: writing through it would create
    # the attacker's chosen file (~/.ssh/authorized_keys).
    missing = tmp_path / "victim" / "authorized_keys"
    link = plant(tmp_path / "ledger.jsonl", missing)
    code, _, err = invoke(capsys, "audit", "export", "--home", str(home), "--out", str(link))
    assert_refused_and_untouched(code, err, link, missing, exists=False)


@pytest.mark.parametrize(
    "command",
    [["audit", "head"], ["audit", "prove", "1"]],
    ids=["signed-head", "inclusion-proof"],
)
def test_attack_link_at_an_audit_document_target(home, outside, tmp_path, capsys, command):
    link = plant(tmp_path / "document.json", outside)
    code, _, err = invoke(capsys, *command, "--home", str(home), "--out", str(link))
    assert_refused_and_untouched(code, err, link, outside)


def test_attack_link_at_the_report_target(outside, tmp_path, capsys):
    # The evidence is incomplete (no model features): --allow-unverified writes anyway,
    # which is the most an attacker can hope for.
    coordinator = _coordinator_after_a_run(tmp_path / "coordinator")
    written = tmp_path / "report.html"
    invoke(capsys, "report", str(coordinator), "--allow-unverified", "--out", str(written))
    assert b"UNVERIFIED" in written.read_bytes()  # a report is written to a plain path
    link = plant(tmp_path / "linked-report.html", outside)
    code, _, err = invoke(
        capsys, "report", str(coordinator), "--allow-unverified", "--out", str(link)
    )
    assert_refused_and_untouched(code, err, link, outside)


def test_attack_link_at_a_private_key_target(outside, tmp_path, capsys):
    # The federation's CA key would be written through the link: refused before any key
    # of the set is written, so no half-replaced set is left behind either.
    certs = tmp_path / "certs"
    link = plant(certs / "ca.key", outside)
    code, _, err = invoke(
        capsys, "federate", "certs", "--out", str(certs), "--site", "site-a", "--force"
    )
    assert_refused_and_untouched(code, err, link, outside)
    assert sorted(p.name for p in certs.iterdir()) == ["ca.key"]


def test_attack_link_at_the_config_file(home, outside):
    ws = Workspace.open(home)
    outside.write_bytes(ws.config_path.read_bytes())
    precious = outside.read_bytes()
    ws.config_path.unlink()
    ws.config_path.symlink_to(outside)
    with pytest.raises(OSError, match=REFUSED):
        Workspace.open(home).with_config("server", port=9999)
    assert outside.read_bytes() == precious
    assert ws.config_path.is_symlink()


def test_attack_link_at_a_sealed_cache(tmp_path, outside):
    link = plant(tmp_path / "prepared" / "train.sealed", outside)
    with pytest.raises(OSError, match=REFUSED):
        write_sealed(link, b"records", bytes(32), context="test")
    assert outside.read_bytes() == PRECIOUS


def test_attack_link_at_a_log_a_child_process_writes(tmp_path, outside):
    link = plant(tmp_path / "federation" / "supernode.log", outside)
    with pytest.raises(OSError, match=REFUSED):
        open_no_follow(link)
    assert outside.read_bytes() == PRECIOUS


def test_attack_dangling_link_at_a_new_secret_creates_nothing(tmp_path):
    missing = tmp_path / "victim" / "planted.key"
    link = plant(tmp_path / "keys" / "pseudonym.key", missing)
    assert atomic_create_bytes(link, b"secret", mode=0o600) is False
    assert not missing.exists()
    assert [p.name for p in link.parent.iterdir()] == ["pseudonym.key"]


# -- links at the temporary path: never followed ----------------------------------------


@pytest.fixture
def guessed_names(monkeypatch: pytest.MonkeyPatch) -> str:
    """The attacker guesses the next temporary name (tempfile's generator is rigged)."""
    guess = "guessed"

    def names() -> Iterator[str]:
        return itertools.chain([guess], (f"fresh{n}" for n in itertools.count()))

    monkeypatch.setattr(tempfile, "_get_candidate_names", names)
    return guess


def test_attack_link_at_the_guessed_temporary_name_is_never_followed(
    home, outside, tmp_path, capsys, guessed_names
):
    target = tmp_path / "out" / "ledger.jsonl"
    # At the name about to be drawn, and at the predictable names older code used.
    links = [
        plant(target.parent / f".{target.name}.{guessed_names}.tmp", outside),
        plant(target.parent / f".{target.name}.tmp-{os.getpid()}", outside),
        plant(target.with_suffix(".tmp"), outside),
    ]
    code, out, err = invoke(capsys, "audit", "export", "--home", str(home), "--out", str(target))
    assert (code, err) == (0, "")
    assert "exported 1 entries" in out
    assert outside.read_bytes() == PRECIOUS
    assert all(link.is_symlink() and link.readlink() == outside for link in links)
    assert not target.is_symlink()
    assert verify_export(target).report.entries == 1
    assert sorted(p.name for p in target.parent.iterdir() if not p.is_symlink()) == [target.name]


def test_a_secret_written_atomically_is_private_from_its_first_byte(tmp_path, guessed_names):
    # mkstemp creates 0600 and the mode is set before any byte is written.
    path = tmp_path / "data.key"
    assert atomic_create_bytes(path, b"secret", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == b"secret"


def _coordinator_after_a_run(home: Path) -> Path:
    """A coordinator whose ledger records a completed run (as tests/report does)."""
    ws, _ = Workspace.init(home, name="coordinator")
    run_id = "20240501T120000Z-abc123"
    model = ws.home / "models" / run_id / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"the federated model's ONNX bytes")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    with ws.ledger() as ledger:
        events.FEDERATION_STARTED.record(
            ledger, run=run_id, dataset="adult", schema_sha256="0" * 64, site_names=[]
        )
        events.FEDERATION_COMPLETED.record(
            ledger,
            run=run_id,
            rounds=2,
            central_accuracy=0.81,
            model_sha256=digest,
            onnx_sha256=digest,
            epsilon_run=3.0,
            delta=1e-5,
            round_entries=[],
        )
    return home
