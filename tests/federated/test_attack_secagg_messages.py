"""Attack: read a site's individual update, or a statistic of its data, off its messages.

With SecAgg+ the aggregator should learn only the sum of the updates. An earlier insitu
sent, beside the masked vector, ``update_digest`` (a hash of the site's own update taken
*before* masking: with predictable noise, an exact membership oracle), the site's mean
training loss in clear, and exact evaluation figures on held-out records. Every message a
site sends is witnessed by the site itself (``federation.egress`` in its own ledger, with
every metric it sent and its value, measured *after* SecAgg+ masked the update, as on the
wire): this test reads those witnesses as an aggregator would read the messages.
"""

from __future__ import annotations

import pytest

from insitu.data import read_table
from insitu.datasets import builtin_data
from insitu.federated import FederationConfig, simulate
from insitu.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    # Ray's leftovers (see conftest._collect_ray_leftovers), never insitu's own.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

#: Everything a site may say beside the masked vector, and why it is safe.
FIT_METRICS = {
    "fitres.metrics.site",  # its name
    "fitres.metrics.epsilon_run",  # this run's epsilon: a function of public settings
    "fitres.num_examples.num_examples",  # its weight, fixed before the run
    "fitres.status.code",
    "fitres.status.message",
}
EVALUATE_METRICS = {
    "evaluateres.loss.loss",  # 0.0: not released under record-level privacy
    "evaluateres.metrics.correct",  # noisy, charged to the held-out subjects
    "evaluateres.metrics.count",  # noisy, charged to the held-out subjects
    "evaluateres.num_examples.num_examples",  # its weight again
    "evaluateres.status.code",
    "evaluateres.status.message",
}


def _egress(result) -> list[tuple[str, dict]]:
    seen = []
    for home in result.site_homes:
        with Workspace.open(home).ledger() as ledger:
            site = ledger.entries(event_type="federation.egress")
            rounds = ledger.entries(event_type="federation.site_round")
            seen += [
                (e.payload, rounds[-1].payload) for e in site if e.payload["run"] == result.run_id
            ]
    return seen


def test_with_secagg_no_message_carries_a_function_of_the_unmasked_update(workspace):
    frame = read_table(builtin_data("adult")).iloc[:6000].drop(columns=["record_id"])
    config = FederationConfig(sites=3, rounds=1, privacy="record", epsilon=3, batch_size=64)
    result = simulate(workspace, frame, config, label="income")
    messages = _egress(result)
    assert len(messages) == 3 * 5  # 4 SecAgg+ stages and one evaluation per site
    for payload, site_round in messages:
        sent = payload["metrics_sent"]
        assert payload["unclassified_bytes"] == 0
        if payload["message"] == "train":
            # The update leaves only as SecAgg+'s masked vector, in its own stage.
            assert (payload["model_update_bytes"] > 0) == (
                payload["stage"] == "collect_masked_vectors"
            )
            assert set(sent) <= FIT_METRICS, set(sent) - FIT_METRICS
            if sent:
                # The weight was fixed before the run: it is not the count of rows used.
                assert sent["fitres.num_examples.num_examples"] != site_round["rows"]
        else:
            assert payload["model_update_bytes"] == 0
            assert set(sent) <= EVALUATE_METRICS, set(sent) - EVALUATE_METRICS
            # Noisy counts, never the exact number of held-out subjects or of right answers.
            assert not float(sent["evaluateres.metrics.count"]).is_integer()
            assert not float(sent["evaluateres.metrics.correct"]).is_integer()
            assert sent["evaluateres.loss.loss"] == 0.0
        strings = [v for v in sent.values() if isinstance(v, str)]
        assert set(strings) <= {"Success", *(f"site-0{i}" for i in (1, 2, 3))}


def test_control_without_secagg_the_same_witness_sees_each_update_in_clear(workspace):
    frame = read_table(builtin_data("adult")).iloc[:6000].drop(columns=["record_id"])
    config = FederationConfig(
        sites=3, rounds=1, privacy="record", epsilon=3, batch_size=64, secure_aggregation=False
    )
    result = simulate(workspace, frame, config, label="income")
    fits = [p for p, _ in _egress(result) if p["message"] == "train"]
    assert len(fits) == 3
    assert all(p["stage"] is None and p["model_update_bytes"] > 0 for p in fits)
