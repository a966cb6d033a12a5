"""Training provenance for a model card, read from the publisher's ledger.

The federated trainer records each round (``federation.round``, with the largest epsilon
any site has spent so far) and, at the end, ``federation.completed`` with the SHA-256 of
the exported ONNX file and the sequence numbers of the run's rounds. When that digest is
the digest of the model being bundled, the card's provenance names exactly that run and
its rounds, and the privacy figures stated for the card are checked against the ledger:
a card may not state a smaller epsilon than the ledger recorded for its training.

Models trained elsewhere carry the ``training.*`` entries of the ledger, if any, and
``run: null``: the card then says that no federated run of this node produced them.
"""

from __future__ import annotations

from typing import Any

from insitu.audit import Entry, Ledger
from insitu.errors import UsageError

__all__ = ["COMPLETED", "ROUND", "provenance_for"]

COMPLETED = "federation.completed"
ROUND = "federation.round"
_OTHER_TRAINING = "training."


def _ref(entry: Entry) -> dict[str, Any]:
    return {"seq": entry.seq, "type": entry.type, "hash": entry.hash.hex()}


def provenance_for(
    ledger: Ledger,
    *,
    model_sha256: str,
    node: str,
    data_schema_sha256: str | None,
    stated_epsilon: float | None,
) -> dict[str, Any]:
    """The provenance of the model whose ONNX digest is ``model_sha256``.

    Raises:
        UsageError: the ledger records differentially private training of this model
            and the stated epsilon is missing or smaller than recorded.

    """
    runs = [
        e
        for e in ledger.entries(event_type=COMPLETED, newest_first=True)
        if e.payload.get("onnx_sha256") == model_sha256
    ]
    if not runs:
        rounds = [_ref(e) for e in ledger.entries(event_type=_OTHER_TRAINING)]
        return {
            "node": node,
            "run": None,
            "training_rounds": rounds,
            "data_schema_sha256": data_schema_sha256,
        }
    completed = runs[0]
    wanted = {int(seq) for seq in completed.payload.get("round_entries", [])}
    round_entries = [e for e in ledger.entries(event_type=ROUND) if e.seq in wanted]
    recorded = max((float(e.payload.get("epsilon_max") or 0.0) for e in round_entries), default=0.0)
    if recorded > 0 and (stated_epsilon is None or stated_epsilon < recorded):
        raise UsageError(
            f"the ledger records federated run {completed.payload.get('run')} of this model "
            f"with epsilon {recorded:g}; state --epsilon {recorded:g} (or more) and --delta "
            "for its card: a card may not understate the privacy cost"
        )
    return {
        "node": node,
        "run": completed.payload.get("run"),
        "run_entry": _ref(completed),
        "training_rounds": [_ref(e) for e in round_entries],
        "epsilon_recorded": recorded,
        "data_schema_sha256": data_schema_sha256,
    }
