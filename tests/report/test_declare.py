"""``insitu report declare``: the controller's Art. 30 declaration, recorded once per change."""

from __future__ import annotations

import json

import pytest

from insitu.cli import run
from insitu.errors import PersonalDataError, UsageError
from insitu.report import declare_processing, load_declaration


def _declarations(workspace) -> list[dict]:
    with workspace.ledger() as ledger:
        return [e.payload for e in ledger.entries(event_type="processing.declared")]


def test_a_declaration_is_recorded_once_and_amended_item_by_item(workspace):
    first = declare_processing(
        workspace, {"controller": "Ward 7 Hospital", "purposes": ["triage model"]}
    )
    assert first.changed
    assert first.missing == ["data_subjects", "legal_basis", "recipients", "transfers", "retention"]
    again = declare_processing(workspace, {"controller": "Ward 7 Hospital"})
    assert not again.changed  # the same declaration: nothing recorded
    amended = declare_processing(workspace, {"retention": "5 years", "purposes": "triage model"})
    assert amended.changed
    # An item not given keeps its value; an empty one withdraws it.
    assert amended.items["controller"] == "Ward 7 Hospital"
    withdrawn = declare_processing(workspace, {"retention": ""})
    assert withdrawn.items["retention"] is None
    recorded = _declarations(workspace)
    assert len(recorded) == 3
    assert recorded[-1]["controller"] == "Ward 7 Hospital"
    assert recorded[-1]["retention"] is None
    assert recorded[1]["retention"] == "5 years"


def test_declare_from_the_command_line_and_a_file(workspace, tmp_path, capsys):
    home = str(workspace.home)
    declared = tmp_path / "declaration.toml"
    declared.write_text(
        'controller = "Ward 7 Hospital"\npurposes = ["triage model", "evaluation"]\n'
        'data-subjects = "patients of ward 7"\nlegal_basis = "GDPR art. 9(2)(j)"\n'
    )
    argv = ["report", "declare", "--from", str(declared), "--retention", "5 years"]
    assert run([*argv, "--home", home, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recorded"] is True
    assert shown["declaration"]["purposes"] == ["triage model", "evaluation"]
    assert shown["not_declared"] == ["recipients", "transfers"]
    assert run([*argv, "--home", home]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert len(_declarations(workspace)) == 1
    assert run(["report", "declare", "--home", home]) == 2
    assert "nothing to declare" in capsys.readouterr().err


def test_a_declaration_with_another_item_or_contact_details_is_refused(workspace, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('controller = "Ward 7"\nowner = "me"\n')
    with pytest.raises(UsageError, match="'owner' is not an item of a declaration"):
        load_declaration(bad)
    with pytest.raises(UsageError, match="not items of a declaration: owner"):
        declare_processing(workspace, {"owner": "me"})
    with pytest.raises(PersonalDataError, match="name the controller or recipient"):
        declare_processing(workspace, {"controller": "dpo@ward7.example.org"})
    assert _declarations(workspace) == []
