"""The card's provenance comes from the ledger, and cannot understate the privacy cost."""

from __future__ import annotations

import hashlib

import pytest

from insitu.bundle._provenance import provenance_for
from insitu.errors import UsageError


def _run(ledger, model: bytes, epsilons: list[float], run: str = "run-1") -> list[int]:
    seqs = []
    for number, eps in enumerate(epsilons, 1):
        entry = ledger.record(
            "federation.round", run=run, round=number, sites_ok=3, epsilon_max=eps
        )
        seqs.append(entry.seq)
    ledger.record(
        "federation.completed",
        run=run,
        rounds=len(epsilons),
        onnx_sha256=hashlib.sha256(model).hexdigest(),
        round_entries=seqs,
    )
    return seqs


def test_the_run_that_exported_the_model_is_named(ledger, model):
    _run(ledger, b"another model", [0.5], run="other")
    seqs = _run(ledger, model, [0.8, 1.6, 2.4])
    prov = provenance_for(
        ledger,
        model_sha256=hashlib.sha256(model).hexdigest(),
        node="n",
        data_schema_sha256="ab" * 32,
        stated_epsilon=3.0,
    )
    assert prov["run"] == "run-1"
    assert [r["seq"] for r in prov["training_rounds"]] == seqs
    assert prov["epsilon_recorded"] == 2.4
    assert prov["run_entry"]["type"] == "federation.completed"
    assert ledger.get(seqs[0]).hash.hex() == prov["training_rounds"][0]["hash"]


@pytest.mark.parametrize("stated", [None, 1.0])
def test_a_card_may_not_understate_epsilon(ledger, model, stated):
    _run(ledger, model, [0.8, 2.4])
    with pytest.raises(UsageError, match=r"epsilon 2\.4"):
        provenance_for(
            ledger,
            model_sha256=hashlib.sha256(model).hexdigest(),
            node="n",
            data_schema_sha256=None,
            stated_epsilon=stated,
        )


def test_a_model_trained_elsewhere_lists_training_entries(ledger, model):
    ledger.record("training.round", round=1, loss=0.3)
    prov = provenance_for(
        ledger,
        model_sha256=hashlib.sha256(model).hexdigest(),
        node="n",
        data_schema_sha256=None,
        stated_epsilon=None,
    )
    assert prov["run"] is None
    assert [r["type"] for r in prov["training_rounds"]] == ["training.round"]
