"""The card's provenance comes from the ledger, and cannot understate the privacy cost.

The runs here are written as the trainer writes them (``epsilon_run`` on
``federation.completed``) and as older ledgers hold them (``epsilon_max`` per round);
optimization steps as ``insitu optimize`` records them (``model.optimized``).
"""

from __future__ import annotations

import hashlib
import itertools

import pytest

from insitu.bundle._provenance import provenance_for
from insitu.errors import UnderstatedPrivacyError, UsageError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(ledger, model: bytes, epsilons: list[float], run: str = "run-1") -> list[int]:
    """A run as older ledgers hold it: ``epsilon_max`` per round, none on completion."""
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
        onnx_sha256=_sha(model),
        round_entries=seqs,
    )
    return seqs


def _new_run(ledger, model: bytes, epsilon: float | None, run: str = "run-2"):
    """A run as the trainer records it now: this run's epsilon on ``federation.completed``."""
    seq = ledger.record("federation.round", run=run, round=1, epsilon_run_max=epsilon or 0.0).seq
    return ledger.record(
        "federation.completed",
        run=run,
        rounds=1,
        onnx_sha256=_sha(model),
        epsilon_run=epsilon,
        delta=None if epsilon is None else 1e-5,
        round_entries=[seq],
    )


def _optimized(ledger, source: bytes, chosen: bytes, method: str, **extra):
    payload = {
        "source_onnx_sha256": _sha(source),
        "chosen": method,
        "chosen_sha256": _sha(chosen),
        "chosen_learnt_from": "nothing (no fine-tuning or calibration)",
    }
    return ledger.record("model.optimized", **(payload | extra))


def _prov(ledger, model: bytes, stated: float | None):
    return provenance_for(
        ledger, model_sha256=_sha(model), node="n", data_schema_sha256=None, stated_epsilon=stated
    )


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
    with pytest.raises(UnderstatedPrivacyError, match=r"epsilon 2\.4"):
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


def test_the_runs_own_epsilon_is_the_one_recorded_on_completion(ledger, model):
    completed = _new_run(ledger, model, 2.5)
    with pytest.raises(UnderstatedPrivacyError, match=r"run-2 of this model with epsilon 2\.5"):
        _prov(ledger, model, 2.0)
    prov = _prov(ledger, model, 2.5)
    assert prov["run_entry"]["seq"] == completed.seq
    assert prov["epsilon_recorded"] == 2.5
    assert prov["delta_recorded"] == 1e-5
    assert "optimized_from" not in prov


def test_an_optimized_model_inherits_its_runs_epsilon_through_every_step(ledger, model):
    _new_run(ledger, model, 3.0)
    first = _optimized(ledger, model, b"pruned model", "pruned",
                       chosen_learnt_from="public calibration data " + "ab" * 32)  # fmt: skip
    second = _optimized(ledger, b"pruned model", b"quantized model", "int8-dynamic")
    with pytest.raises(
        UnderstatedPrivacyError, match=r"optimized from \(model\.optimized entry \d+\)"
    ):
        _prov(ledger, b"quantized model", 0.1)
    prov = _prov(ledger, b"quantized model", 3.0)
    assert prov["run"] == "run-2"
    step = prov["optimized_from"]
    assert step["optimization_entry"]["seq"] == second.seq
    assert step["method"] == "int8-dynamic"
    assert step["source_sha256"] == _sha(b"pruned model")
    earlier = step["source_optimized_from"]
    assert earlier["optimization_entry"]["seq"] == first.seq
    assert earlier["learnt_from"] == "public calibration data " + "ab" * 32


def test_a_model_optimized_before_its_source_existed_has_no_provenance(ledger, model):
    # A link points backwards: an entry cannot adopt a run recorded after it.
    _optimized(ledger, model, b"optimized", "int8-dynamic")
    _new_run(ledger, model, 3.0)
    with pytest.raises(UsageError, match="can make no privacy claim"):
        _prov(ledger, b"optimized", 3.0)


def test_chains_longer_than_the_bound_are_not_followed(ledger, model):
    from insitu.bundle._provenance import MAX_STEPS

    _new_run(ledger, model, 3.0)
    models = [model, *(f"step {i}".encode() for i in range(MAX_STEPS + 1))]
    for source, chosen in itertools.pairwise(models):
        _optimized(ledger, source, chosen, "int8-dynamic")
    assert _prov(ledger, models[MAX_STEPS], 3.0)["run"] == "run-2"
    with pytest.raises(UsageError, match="can make no privacy claim"):
        _prov(ledger, models[MAX_STEPS + 1], 3.0)


def test_a_model_optimized_on_records_not_declared_public_cannot_claim_an_epsilon(ledger, model):
    # An entry from before the declaration existed: a pruned choice fine-tuned on
    # whatever --calibration held, without DP.
    _new_run(ledger, model, 3.0)
    legacy = ledger.record(
        "model.optimized",
        source_onnx_sha256=_sha(model),
        chosen="pruned",
        chosen_sha256=_sha(b"pruned"),
    )
    with pytest.raises(UsageError, match=rf"does not cover this model.*entry {legacy.seq}"):
        _prov(ledger, b"pruned", 30.0)
    prov = _prov(ledger, b"pruned", None)
    assert prov["optimized_from"]["learnt_from"] == "calibration records not declared public"


def test_a_run_without_differential_privacy_supports_no_privacy_claim(ledger, model):
    _new_run(ledger, model, None)
    with pytest.raises(UsageError, match="trained without differential privacy; drop --epsilon"):
        _prov(ledger, model, 1.0)
    prov = _prov(ledger, model, None)
    assert prov["run"] == "run-2"
    assert prov["epsilon_recorded"] is None


def test_the_most_demanding_chain_to_a_digest_is_used(ledger, model):
    # The same bytes reached from two runs: the card answers to the costlier one.
    _new_run(ledger, model, 8.0, run="costly")
    _new_run(ledger, b"another source", 1.0, run="cheap")
    _optimized(ledger, model, b"same", "int8-dynamic")
    _optimized(ledger, b"another source", b"same", "int8-dynamic")
    with pytest.raises(UnderstatedPrivacyError, match="costly"):
        _prov(ledger, b"same", 1.0)
    assert _prov(ledger, b"same", 8.0)["run"] == "costly"


def test_a_model_with_no_provenance_can_claim_no_epsilon(ledger, model):
    ledger.record("training.round", round=1, loss=0.3, epsilon_spent=1.5)
    with pytest.raises(UsageError, match="can make no privacy claim: drop --epsilon and --delta"):
        _prov(ledger, model, 1.5)
