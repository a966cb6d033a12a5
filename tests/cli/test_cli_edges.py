"""The CLI's edges: exit codes of crashes, JSON errors, warnings once, honest messages.

Each test drives ``run()`` in-process, as a user's shell or script would see it: the exit
code, stdout (the JSON document a script reads) and stderr (the human line).
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

import insitu.cli.workspace
import insitu.serve
from insitu.cli import run
from insitu.cli._app import EX_SOFTWARE
from insitu.datasets import builtin_data
from insitu.workspace import Workspace

_PASSPHRASE_WARNING = "INSITU_PASSPHRASE"  # named once in the warning, in no other line


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _raise(exc: BaseException) -> Any:
    def fail(*_: object, **__: object) -> None:
        raise exc

    return fail


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    path = str(tmp_path / "ws")
    assert run(["init", "--home", path]) == 0
    capsys.readouterr()
    return path


@pytest.fixture
def warn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process as far as the passphrase warning goes (earlier tests gave it)."""
    from insitu.workspace import _workspace

    monkeypatch.setitem(_workspace._warned, "unencrypted", False)


# 1. A crash is not a failure: exit 70; the machine refusing is a failure: exit 1.


def test_a_crash_exits_70_not_1(home, capsys, monkeypatch):
    monkeypatch.setattr(insitu.cli.workspace, "describe", _raise(RuntimeError("boom")))
    code, out, err = invoke(capsys, "info", "--home", home)
    assert code == EX_SOFTWARE == 70
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: unexpected RuntimeError: boom; rerun with --debug")
    assert "Traceback" not in err


def test_a_crash_under_debug_shows_the_traceback_and_still_exits_70(home, capsys, monkeypatch):
    monkeypatch.setattr(insitu.cli.workspace, "describe", _raise(RuntimeError("boom")))
    code, _, err = invoke(capsys, "--debug", "info", "--home", home)
    assert code == 70
    assert "Traceback" in err


@pytest.mark.parametrize(
    ("number", "check"),
    [
        (errno.ENOSPC, "free space on its disk"),
        (errno.EACCES, "permissions"),
        (errno.EROFS, "read-only"),
    ],
)
def test_an_os_error_is_one_line_naming_the_file_and_what_to_check_exit_1(
    home, capsys, monkeypatch, number, check
):
    failure = OSError(number, os.strerror(number), "/srv/insitu/ledger.db")
    monkeypatch.setattr(insitu.cli.workspace, "describe", _raise(failure))
    code, out, err = invoke(capsys, "info", "--home", home)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"error: cannot use /srv/insitu/ledger.db: {os.strerror(number)}")
    assert check in err
    assert "unexpected" not in err


def test_an_os_error_without_a_file_still_says_what_to_check(home, capsys, monkeypatch):
    failure = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(insitu.cli.workspace, "describe", _raise(failure))
    code, _, err = invoke(capsys, "info", "--home", home)
    assert code == 1
    assert err.count("\n") == 1
    assert os.strerror(errno.ENOSPC) in err
    assert "free space on its disk" in err


# 2. Under --json, every failure is also one JSON object on stdout.


def test_json_failure_prints_an_error_object(tmp_path, capsys):
    code, out, err = invoke(capsys, "audit", "log", "--home", str(tmp_path / "none"), "--json")
    assert code == 1
    document = json.loads(out)
    assert document == {
        "error": document["error"],
        "exit_code": 1,
        "type": "WorkspaceNotFoundError",
    }
    assert document["error"].startswith("no insitu workspace")
    # stderr keeps the human line, the same line.
    assert err == f"error: {document['error']}\n"


@pytest.mark.parametrize(
    ("args", "error_type", "words"),
    [
        (["info", "--json", "--bogus"], "NoSuchOption", "--bogus"),
        # The bad value comes before --json: parsing stops before --json is read.
        (["audit", "log", "--limit", "zero", "--json"], "BadParameter", "zero"),
        (["audit", "log", "--limit", "0", "--json"], "BadParameter", "0"),
    ],
)
def test_json_usage_error_prints_an_error_object_with_exit_2(home, capsys, args, error_type, words):
    code, out, err = invoke(capsys, *args, "--home", home)
    assert code == 2
    document = json.loads(out)
    assert document["exit_code"] == 2
    assert document["type"] == error_type
    assert words in document["error"]
    assert "Usage:" in err  # the human form: usage line, then the error


def test_a_command_that_wrote_its_json_document_gets_no_second_one(home, capsys):
    # 'audit verify' writes its findings, then fails: stdout still holds one document.
    from tests.audit._tamper import raw

    raw(Path(home) / "ledger.db").execute("UPDATE entries SET payload = '{}' WHERE seq = 1")
    code, out, _ = invoke(capsys, "audit", "verify", "--home", home, "--json")
    assert code == 1
    assert json.loads(out)["first_bad_seq"] == 1


def test_json_crash_prints_an_error_object_with_exit_70(home, capsys, monkeypatch):
    monkeypatch.setattr(insitu.cli.workspace, "describe", _raise(ValueError("bug")))
    code, out, _ = invoke(capsys, "info", "--home", home, "--json")
    assert code == 70
    assert json.loads(out) == {
        "error": json.loads(out)["error"],
        "exit_code": 70,
        "type": "ValueError",
    }


def test_a_command_without_json_prints_no_json_object(home, capsys):
    # 'audit prove' writes its proof document itself and offers no --json: a usage
    # error stays on stderr only.
    code, out, err = invoke(capsys, "audit", "prove", "--home", home, "--json")
    assert code == 2
    assert out == ""
    assert "No such option" in err


def test_without_json_a_failure_prints_nothing_on_stdout(tmp_path, capsys):
    code, out, _ = invoke(capsys, "audit", "log", "--home", str(tmp_path / "none"))
    assert code == 1
    assert out == ""


def test_json_request_does_not_leak_into_the_next_command(tmp_path, capsys):
    invoke(capsys, "audit", "log", "--home", str(tmp_path / "none"), "--json")
    code, out, _ = invoke(capsys, "audit", "log", "--home", str(tmp_path / "none"))
    assert code == 1
    assert out == ""


# 3. Warnings once per process.


def test_init_without_a_passphrase_warns_once(tmp_path, capsys, warn_again):
    code, out, err = invoke(capsys, "init", "--home", str(tmp_path / "ws"))
    assert code == 0, err
    assert err.count(_PASSPHRASE_WARNING) == 1, err
    assert "not encrypted" in out  # the summary still says so


def test_init_json_without_a_passphrase_warns_once(tmp_path, capsys, warn_again):
    code, out, err = invoke(capsys, "init", "--home", str(tmp_path / "ws"), "--json")
    assert code == 0, err
    assert json.loads(out)["keys_encrypted"] is False
    assert err.count(_PASSPHRASE_WARNING) == 1, err


def test_a_command_creating_several_site_workspaces_warns_once(home, tmp_path, capsys, warn_again):
    # A consent file without its columns stops the run after the sites are created and
    # before any training starts.
    consent = tmp_path / "consent.csv"
    consent.write_text("a,b\n1,2\n")
    code, _, err = invoke(
        capsys, "federate", "simulate", "--home", home, "--data", str(builtin_data("adult")),
        "--label", "income", "--sites", "3", "--rounds", "1", "--consent", str(consent),
    )  # fmt: skip
    assert code == 1, err
    assert "missing column(s)" in err
    assert sorted(p.name for p in (Path(home) / "sites").iterdir()) == [
        "site-01",
        "site-02",
        "site-03",
    ]
    assert err.count(_PASSPHRASE_WARNING) == 1, err


# 4. 'insitu serve' says it serves only once it does.


def test_serve_without_a_model_does_not_say_it_is_serving(workspace, capsys):
    code, _, err = invoke(capsys, "serve", "--home", str(workspace.home), "--port", "0")
    assert code == 1
    assert "no model is installed" in err
    assert "serving on" not in err


def test_serve_on_a_port_in_use_fails_before_saying_it_is_serving(workspace, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = invoke(
            capsys, "serve", "--home", str(workspace.home), "--port", str(port), "--json"
        )
    assert code == 1
    assert err.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "serving on" not in err
    assert json.loads(out)["type"] == "CannotListenError"


def test_serve_says_it_is_serving_only_once_its_socket_accepts(tmp_path, capsys, monkeypatch):
    # The real server (uvicorn, the installed model): when the line is printed, the
    # port already accepts connections; then the server is asked to stop.
    from insitu.serve import _server
    from tests.bundle._models import mlp
    from tests.serve.conftest import make_site

    site = make_site(tmp_path / "site", mlp([8, 16, 3])[0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers: list[Any] = []
    accepted: list[bool] = []
    make = _server._announcing_server

    def announcing(config: Any, on_started: Any) -> Any:
        def started() -> None:
            with socket.socket() as client:
                accepted.append(client.connect_ex(("127.0.0.1", port)) == 0)
            on_started()
            servers[0].should_exit = True

        servers.append(make(config, started))
        return servers[0]

    monkeypatch.setattr(_server, "_announcing_server", announcing)
    code, _, err = invoke(capsys, "serve", "--home", str(site.workspace.home), "--port", str(port))
    assert code == 0, err
    assert accepted == [True]
    assert err.count(f"serving on http://127.0.0.1:{port}") == 1


# 5. Understating epsilon is refused as a failure (exit 1), not as a usage error.


def test_understating_epsilon_exits_1_not_2(home, tmp_path, capsys):
    import hashlib

    from tests.bundle._models import mlp

    model = tmp_path / "model.onnx"
    model.write_bytes(mlp([8, 16, 3])[0])
    with Workspace.open(home).ledger() as ledger:
        rounds = [ledger.record("federation.round", run="r1", round=1, epsilon_max=3.0).seq]
        ledger.record("federation.completed", run="r1", rounds=1, round_entries=rounds,
                      onnx_sha256=hashlib.sha256(model.read_bytes()).hexdigest())  # fmt: skip
    out_path = tmp_path / "m.insb"
    code, out, err = invoke(
        capsys, "bundle", "create", str(model), "--version", "1.0.0", "--out", str(out_path),
        "--no-encrypt", "--epsilon", "1", "--delta", "1e-5", "--home", home, "--json",
    )  # fmt: skip
    assert code == 1, err
    assert "may not understate" in err
    assert json.loads(out)["type"] == "UnderstatedPrivacyError"
    assert not out_path.exists()
