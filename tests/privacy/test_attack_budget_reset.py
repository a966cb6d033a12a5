"""Attack: get a fresh privacy budget for the same people by changing a name.

A budget bound to a file or data-set name reset when the CSV was renamed, when the
schema's ``dataset.name`` changed, or through the Python API with a DataFrame: four
such runs at one site composed to epsilon 1.86 against a budget of 1, while each ledger
showed 0.9996. Budgets are now bound to the data subjects (keyed tokens of the subject
column, or of each row's content). Each test spends a site's budget on a set of records,
then comes back with the same records under another name, order or door, and must be
refused by the site.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.federated import FederationConfig
from insitu.federated._site_app import SiteClient, SitePlan, SiteRoundError, prepare_site_data
from insitu.training import build_model, get_weights
from insitu.workspace import Workspace

ROWS = 3000
CONFIG = FederationConfig(
    sites=1, rounds=1, privacy="record", epsilon=0.8, secure_aggregation=False, batch_size=64
)


@pytest.fixture(scope="module", params=["subject column", "row content"])
def keyed_by(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def records(keyed_by: str) -> pd.DataFrame:
    frame = read_table(builtin_data("adult")).iloc[:ROWS].reset_index(drop=True)
    return frame if keyed_by == "subject column" else frame.drop(columns=["record_id"])


@pytest.fixture(scope="module")
def schema(keyed_by: str) -> DataSchema:
    doc = DataSchema.load(builtin_schema("adult")).source
    doc["consent"] = {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"}
    if keyed_by == "row content":  # no subject column: each row is its own subject
        doc["dataset"].pop("subject")
        doc["identifiers"]["direct"] = []
    return DataSchema.from_dict(doc)


def _site(home: Path) -> Workspace:
    ws, created = Workspace.init(home, name="hospital-a")
    if created:
        from insitu.workspace._config import save_config

        ws.config.sections.setdefault("privacy", {})["epsilon_budget"] = 1.0
        save_config(ws.config_path, ws.config)
    return Workspace.open(home)


def _round(
    home: Path, frame: pd.DataFrame, schema: DataSchema, *, source: str, run: str
) -> dict[str, object]:
    """One site's round of training, as a deployed or simulated site runs it."""
    ws = _site(home)
    train_dir, test_dir = prepare_site_data(ws, frame, schema, test_fraction=0.2, source=source)
    n_features = len(FeatureEncoder.for_schema(schema).names)
    plan = SitePlan(
        run_id=run,
        site="hospital-a",
        home=ws.home,
        train_dir=train_dir,
        test_dir=test_dir,
        dataset=schema.name,
        n_features=n_features,
        config=CONFIG,
    )
    initial = get_weights(build_model("logistic", n_features))
    _, weight, metrics = SiteClient(plan).fit(initial, {"round": 1})
    return {"weight": weight, **metrics}


def _renamed(schema: DataSchema, name: str) -> DataSchema:
    doc = {**schema.source, "dataset": {**schema.source["dataset"], "name": name}}
    return DataSchema.from_dict(doc)


def _edit_node_name(home: Path) -> None:
    from insitu.workspace._config import save_config

    ws = Workspace.open(home)
    ws.config.sections["node"]["name"] = "hospital-a-renamed"
    save_config(ws.config_path, ws.config)


@pytest.mark.parametrize(
    "attack",
    ["renamed file", "renamed data set", "shuffled rows", "data frame", "renamed workspace"],
)
def test_the_same_subjects_are_refused_under_another_name(tmp_path, records, schema, attack):
    home = tmp_path / "site"
    first = _round(home, records, schema, source="adult.csv", run="r1")
    assert 0 < float(first["epsilon_run"]) <= 0.8
    frame, source, again = records, "adult.csv", schema
    if attack == "renamed file":
        source = "adult-2024-final.csv"
    elif attack == "renamed data set":
        again = _renamed(schema, "census-income")
    elif attack == "shuffled rows":
        frame = records.sample(frac=1.0, random_state=3).reset_index(drop=True)
    elif attack == "data frame":
        source = "data"
        frame = pd.DataFrame({c: records[c].to_list() for c in records.columns})
    elif attack == "renamed workspace":
        _edit_node_name(home)
    with pytest.raises(SiteRoundError, match=r"\[site hospital-a: budget\]"):
        _round(home, frame, again, source=source, run="r2")


def test_new_records_beside_spent_ones_are_admitted_and_the_spent_ones_left_out(
    tmp_path, records, schema
):
    home = tmp_path / "site"
    _round(home, records.iloc[:2000], schema, source="a.csv", run="r1")
    _round(home, records, schema, source="b.csv", run="r2")
    with Workspace.open(home).ledger() as ledger:
        second = ledger.entries(event_type="federation.site_round")[-1].payload
    # Of 3000 rows, 2000 were spent in r1: about 80% of those are training records.
    assert 1400 < second["excluded_over_budget"] < 1800
    assert 600 < second["rows"] < 1000
