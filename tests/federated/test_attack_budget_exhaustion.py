"""Attack on honesty: a run whose sites run out of budget mid-way must not look like a success.

When every site refused on budget, ``federate simulate`` used to exit 0, print
``sites 0, failed 0``, write the untrained initial model as the run's model and record
``federation.completed``: a cron job would ship it. Here the sites' budgets are set so
that round 1 of 5 fits and round 2 does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from insitu.cli import run
from insitu.data import DataSchema, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.privacy import PrivacyEvent, calibrate_noise, epsilon_of
from insitu.training import planned_event
from insitu.workspace import Workspace
from insitu.workspace._config import save_config

pytestmark = [
    pytest.mark.slow,
    # Ray's leftovers (see conftest._collect_ray_leftovers), never insitu's own.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

SITES, ROWS, BATCH = 3, 9000, 256


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    doc = DataSchema.load(builtin_schema("adult")).source
    doc["consent"] = {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"}
    schema = tmp_path / "adult.schema.toml"
    schema.write_text(tomli_w.dumps(doc))
    data = tmp_path / "adult.csv"
    read_table(builtin_data("adult")).iloc[:ROWS].to_csv(data, index=False)
    return data, schema


def _simulate(capsys, home: Path, data: Path, schema: Path, *args: str) -> tuple[int, str, str]:
    code = run(
        ["federate", "simulate", "--home", str(home), "--data", str(data), "-s", str(schema),
         "--sites", str(SITES), "--batch-size", str(BATCH), *args]
    )  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _round_event(rows: int, epsilon: float, rounds: int) -> PrivacyEvent:
    one = planned_event(rows=rows, batch_size=BATCH, epochs=1, noise_multiplier=1.0)
    sigma = calibrate_noise(
        target_epsilon=epsilon, delta=1e-5, sample_rate=one.sample_rate, steps=one.steps * rounds
    )
    return PrivacyEvent(sigma, one.sample_rate, one.steps)


def test_budget_exhausted_in_round_2_of_5_exits_1_and_presents_no_model(
    tmp_path, capsys, workspace
):
    data, schema = _inputs(tmp_path)
    home = workspace.home
    code, _, err = _simulate(
        capsys, home, data, schema, "--rounds", "1", "--epsilon", "0.7", "--site-budget", "10"
    )
    assert code == 0, err
    # Each site's budget: room for one round of the next run (5 rounds at epsilon 1), not two.
    for site in sorted((home / "sites").iterdir()):
        ws = Workspace.open(site)
        with ws.ledger() as ledger:
            rows = ledger.entries(event_type="federation.site_round")[-1].payload["subjects"]
            (first,) = [
                e.payload
                for e in ledger.entries(event_type="privacy.spent")
                if e.payload["mechanism"] == "dp-sgd"
            ]
        spent = PrivacyEvent(first["noise_multiplier"], first["sample_rate"], first["steps"])
        nxt = _round_event(rows, 1.0, 5)
        one, two = (epsilon_of([spent, *[nxt] * k], delta=1e-5) for k in (1, 2))
        assert one < two
        ws.config.sections["privacy"]["epsilon_budget"] = (one + two) / 2
        save_config(ws.config_path, ws.config)
    models = sorted((home / "models").iterdir())

    code, out, err = _simulate(
        capsys, home, data, schema, "--rounds", "5", "--epsilon", "1.0", "--json"
    )
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "round 2 of 5" in lines[0]
    for index in range(1, SITES + 1):
        assert f"site-0{index} (budget)" in lines[0]
    assert "No model is the result of this run" in lines[0]
    assert not out.strip() or "model_dir" not in json.loads(out)
    assert sorted((home / "models").iterdir()) == models  # nothing written as the result
    with Workspace.open(home).ledger() as ledger:
        failed = ledger.entries(event_type="federation.failed")
        assert [e.payload["round"] for e in failed] == [2]
        assert failed[0].payload["sites"] == {f"site-0{i}": "budget" for i in (1, 2, 3)}
        completed = ledger.entries(event_type="federation.completed")
        assert len(completed) == 1  # the first run only
        rounds = [
            e.payload
            for e in ledger.entries(event_type="federation.round")
            if e.payload["run"] == failed[0].payload["run"]
        ]
        assert [r["round"] for r in rounds] == [1]  # round 1 completed and says so
        assert rounds[0]["sites_ok"] == SITES
