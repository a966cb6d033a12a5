"""Keyed pseudonyms, and that no raw identifier is left anywhere in the workspace."""

from __future__ import annotations

import secrets

from hypothesis import given
from hypothesis import strategies as st

from insitu.cli import run
from insitu.data import ConsentRegistry, DataSchema, Pseudonymizer, SiteDataset
from tests.data.conftest import make_patients


@given(st.text(min_size=1, max_size=40))
def test_pseudonyms_are_stable_per_key_and_differ_across_keys(value):
    key_a, key_b = b"a" * 32, b"b" * 32
    assert Pseudonymizer(key_a).token(value) == Pseudonymizer(key_a).token(value)
    assert Pseudonymizer(key_a).token(value) != Pseudonymizer(key_b).token(value)


def test_pseudonyms_normalize_case_and_spaces():
    p = Pseudonymizer(secrets.token_bytes(32))
    assert p.token(" Jane.Doe@Example.org ") == p.token("jane.doe@example.org")
    assert p.token("jane") != p.token("john")


def test_two_sites_give_the_same_person_unrelated_tokens(workspace, tmp_path):
    from insitu.workspace import Workspace

    other, _ = Workspace.init(tmp_path / "other-site")
    a = Pseudonymizer(workspace.secret("pseudonym")).token("RAWID-0001-Q")
    b = Pseudonymizer(other.secret("pseudonym")).token("RAWID-0001-Q")
    assert a != b


def test_raw_ids_appear_nowhere_in_the_workspace_after_a_run(
    workspace, patients_csv, schema_file, tmp_path, capsys
):
    consent_csv = tmp_path / "inputs" / "consent.csv"
    consent_csv.write_text(
        "subject,purpose,status\n"
        + "".join(f"RAWID-{p:04d}-Q,training,granted\n" for p in range(60))
    )
    home = str(workspace.home)
    sealed = workspace.home / "prepared" / "readmission"
    assert run(["consent", "import", str(consent_csv), "--home", home]) == 0
    assert (
        run(["consent", "withdraw", "RAWID-0007-Q", "--purpose", "training", "--home", home]) == 0
    )
    assert (
        run(
            [
                "data",
                "prepare",
                str(patients_csv),
                "-s",
                str(schema_file),
                "-o",
                str(sealed),
                "--home",
                home,
            ]
        )
        == 0
    )
    ds = SiteDataset.open(workspace, sealed)
    assert ds.for_round(round_number=1).rows == 236
    capsys.readouterr()

    raw = make_patients()
    needles = set()
    for column in ("patient_id", "name", "email", "ssn", "notes"):
        needles |= set(raw[column].unique())
    files = [p for p in workspace.home.rglob("*") if p.is_file()]
    assert any(p.name == "prepared.sealed" for p in files)
    assert any(p.name == "ledger.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{needle} found in {path}"
    # The pseudonyms, on the other hand, are there: the consent changes were recorded.
    with workspace.ledger() as ledger:
        token = ConsentRegistry(ledger, Pseudonymizer(workspace.secret("pseudonym"))).token(
            "RAWID-0007-Q"
        )
        assert any(e.payload.get("subject") == token for e in ledger.entries(event_type="consent."))


def test_schema_digest_changes_with_the_schema(schema_file):
    first = DataSchema.load(schema_file).digest()
    schema_file.write_text(schema_file.read_text().replace("band:20", "band:10"))
    assert DataSchema.load(schema_file).digest() != first
