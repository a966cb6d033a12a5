"""Attack, end to end: a shuffled frame through the Python API for a fresh budget.

The partition into simulated sites follows each row's subject (a keyed token), so the
same people land at the same site whatever the file's name, order or the door they come
through (``tests/privacy/test_attack_budget_reset.py`` attacks one site directly).
"""

from __future__ import annotations

import pytest

from insitu.data import read_table
from insitu.datasets import builtin_data
from insitu.errors import RoundFailedError
from insitu.federated import FederationConfig, simulate
from insitu.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    # Ray's leftovers (see conftest._collect_ray_leftovers), never insitu's own.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_a_shuffled_frame_through_the_python_api_meets_the_same_sites_budgets(tmp_path):
    coordinator, _ = Workspace.init(tmp_path / "coordinator", name="coordinator")
    records = read_table(builtin_data("adult")).iloc[:6000].drop(columns=["record_id"])
    path = tmp_path / "adult.csv"
    records.to_csv(path, index=False)
    config = FederationConfig(
        sites=3, rounds=1, privacy="record", epsilon=0.8, secure_aggregation=False, batch_size=64
    )
    simulate(coordinator, path, config, label="income", site_epsilon_budget=1.0)
    shuffled = records.sample(frac=1.0, random_state=11).reset_index(drop=True)
    with pytest.raises(RoundFailedError) as caught:
        simulate(coordinator, shuffled, config, label="income")
    assert caught.value.sites == {f"site-0{i}": "budget" for i in (1, 2, 3)}
