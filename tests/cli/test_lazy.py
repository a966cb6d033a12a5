"""The root group loads a verb's module only when the verb runs (``insitu.cli._lazy``)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from insitu.cli._lazy import VERBS, LazyGroup, Verb
from insitu.errors import MissingDependencyError

_CHECK_IMPORTS = """
import sys
from insitu.cli import run
code = run(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.startswith("insitu.cli.")
                and m not in {"insitu.cli._app", "insitu.cli._lazy", "insitu.cli._output"})
heavy = sorted(m for m in ("torch", "flwr", "pandas", "onnxruntime", "fastapi") if m in sys.modules)
print(code, ",".join(loaded), ",".join(heavy), sep="|")
"""


def _imports(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_IMPORTS, *args], capture_output=True, text=True, check=True
    )
    return proc.stdout.strip().splitlines()[-1].split("|")


def test_version_and_root_help_import_no_verb_and_no_heavy_package() -> None:
    assert _imports("--version") == ["0", "", ""]
    assert _imports("--help") == ["0", "", ""]


def test_a_verb_imports_its_own_module_only() -> None:
    code, loaded, heavy = _imports("update", "--help")
    assert (code, loaded) == ("0", "insitu.cli.update")
    assert "torch" not in heavy
    assert "pandas" not in heavy


def test_the_table_names_every_command_with_its_panel_and_help() -> None:
    for verb in {v.module for v in VERBS.values()}:
        importlib.import_module(f"insitu.cli.{verb}")
    from insitu.cli._app import app

    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    assert sorted(group.commands) == sorted(VERBS)
    for name, verb in VERBS.items():
        command = group.commands[name]
        assert command.callback is None or command.callback.__module__ == (
            f"insitu.cli.{verb.module}"
        ), name
        assert getattr(command, "rich_help_panel", None) == verb.panel, name
        real = " ".join((command.help or "").split())
        assert real[:24] == verb.help[:24], (name, real[:60], verb.help[:60])


def test_root_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    from insitu.cli import run

    assert run(["--help"]) == 0
    shown = capsys.readouterr().out
    for name in VERBS:
        assert f" {name} " in shown, name


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr("insitu.cli._lazy.importlib.import_module", refuse)
    group = LazyGroup(name="insitu")
    with pytest.raises(
        MissingDependencyError, match=r"insitu federate needs torch.*insitu\[federated\]"
    ):
        group.get_command(click.Context(group), "federate")


def test_a_missing_insitu_module_is_a_bug_not_a_missing_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(VERBS, "ghost", Verb("no_such_module", "A ghost.", "Ghosts"))
    group = LazyGroup(name="insitu")
    with pytest.raises(ModuleNotFoundError):
        group.get_command(click.Context(group), "ghost")


def test_predicting_a_file_without_pandas_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from insitu.runtime import predict_file

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependencyError, match=r"needs pandas.*insitu\[data\]"):
        predict_file(None, "m", tmp_path / "in.csv", tmp_path / "out.csv")  # type: ignore[arg-type]
