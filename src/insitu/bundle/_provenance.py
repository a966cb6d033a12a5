"""Training provenance for a model card, read from the publisher's ledger.

Two kinds of ledger entry name a model by the SHA-256 of its ONNX file:

* ``federation.completed`` (``onnx_sha256``): the federated run that exported it, with
  ``epsilon_run`` (the most any site spent on one record in that run; ``None`` for a run
  without differential privacy), ``delta``, and the sequence numbers of its rounds.
  Older ledgers lack ``epsilon_run``: the largest ``epsilon_run_max`` (or the legacy
  ``epsilon_max``) of the run's ``federation.round`` entries stands in for it.
* ``model.optimized`` (``chosen_sha256``): ``insitu optimize`` chose this model from
  candidates built from the model whose digest is ``source_onnx_sha256``, and recorded
  what the choice learnt from (``chosen_learnt_from``).

The provenance of a model follows these links back to a run: an optimized model's
provenance is its source's (the run, its rounds, the epsilon recorded) plus
``optimized_from`` (the source digest, the optimization entry, the method of the chosen
candidate, what it learnt from, and the earlier step when the source was itself
optimized).

Invariants:

* A card may not state a smaller epsilon than the ledger records for the run behind its
  model, however many optimization steps lie between (at most :data:`MAX_STEPS`): the
  same check for the run's own model and for every model optimized from it. A private
  run's card must state an epsilon.
* A model the ledger does not trace to a federated run of this node, a run trained
  without differential privacy, and a model that learnt from calibration records not
  declared public (which its run's guarantee does not cover) can be bundled only without
  a privacy claim: stating ``--epsilon`` is refused, with the reason and the fix.
* Links point backwards: the source of a ``model.optimized`` entry is looked for among
  older entries only, so every chain ends; a step recorded again (the same source,
  method and data) is followed once, so the search stays small.
* When several chains lead to one digest, the most demanding is used (no privacy claim
  possible, else the largest epsilon): a card cannot pick the weakest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from insitu.audit import Entry, Ledger
from insitu.errors import UnderstatedPrivacyError, UsageError

__all__ = ["COMPLETED", "FINETUNED", "MAX_STEPS", "OPTIMIZED", "ROUND", "provenance_for"]

COMPLETED = "federation.completed"
FINETUNED = "finetune.trained"
ROUND = "federation.round"
OPTIMIZED = "model.optimized"
#: The most optimization steps followed from a model back to its run.
MAX_STEPS = 8
_OTHER_TRAINING = "training."
#: What ``insitu optimize`` records for a choice that learnt from no data.
_LEARNT_NOTHING = "nothing (no fine-tuning or calibration)"
_PUBLIC = "public calibration data "
#: Candidates that need no data (entries recorded before ``chosen_learnt_from`` existed).
_DATA_FREE = frozenset({"fp32", "int8-dynamic"})


def _ref(entry: Entry) -> dict[str, Any]:
    return {"seq": entry.seq, "type": entry.type, "hash": entry.hash.hex()}


@dataclass(frozen=True)
class _Chain:
    """A run, and the optimization steps from it to the model (nearest the model first)."""

    completed: Entry
    rounds: tuple[Entry, ...]
    epsilon: float | None
    delta: float | None
    steps: tuple[dict[str, Any], ...] = ()
    #: Why no privacy claim is possible along this chain besides the run's own figures.
    uncovered: str | None = None

    def demand(self) -> tuple[float, int]:
        """Orders chains: no claim possible first, then the larger epsilon, then newer."""
        if self.epsilon is None or self.uncovered is not None:
            return math.inf, self.completed.seq
        return self.epsilon, self.completed.seq


def _recorded(completed: Entry, rounds: tuple[Entry, ...]) -> tuple[float | None, float | None]:
    """(epsilon of the run, delta): None epsilon for a run without differential privacy."""
    payload = completed.payload
    delta = payload.get("delta")
    if "epsilon_run" in payload:
        epsilon = payload["epsilon_run"]
        return (None if epsilon is None else float(epsilon)), delta
    for key in ("epsilon_run_max", "epsilon_max"):
        figures = [float(e.payload[key]) for e in rounds if e.payload.get(key) is not None]
        if figures:
            # An old ledger's zero epsilon is a run without DP, not a free guarantee.
            return (max(figures) if max(figures) > 0 else None), delta
    return None, delta


def _learnt_from(entry: Entry) -> tuple[str, str | None]:
    """(what the chosen candidate learnt from, why its run's DP does not cover it, or None)."""
    payload = entry.payload
    learnt = payload.get("chosen_learnt_from")
    if learnt is None:  # recorded before insitu asked whether calibration data is public
        if payload.get("chosen") in _DATA_FREE:
            return _LEARNT_NOTHING, None
        learnt = "calibration records not declared public"
    text = str(learnt)
    if text == _LEARNT_NOTHING or text.startswith(_PUBLIC):
        return text, None
    return (
        text,
        f"it learnt from {text} without differential privacy ({OPTIMIZED} entry {entry.seq})",
    )


class _Resolver:
    """Finds every chain from a digest back to a run, in one read of the ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        # A chain starts at a training that recorded its model's digest and privacy: a
        # federated run, or a device's own fine-tuning of an installed model.
        self.completed = sorted(
            (
                e
                for kind in (COMPLETED, FINETUNED)
                for e in ledger.entries(event_type=kind, newest_first=True)
                if e.type == kind
            ),
            key=lambda e: -e.seq,
        )
        self.optimized = [
            e
            for e in ledger.entries(event_type=OPTIMIZED, newest_first=True)
            if e.type == OPTIMIZED
        ]
        self._rounds: list[Entry] | None = None

    def rounds_of(self, completed: Entry) -> tuple[Entry, ...]:
        if self._rounds is None:
            self._rounds = [e for e in self.ledger.entries(event_type=ROUND) if e.type == ROUND]
        wanted = {int(seq) for seq in completed.payload.get("round_entries", [])}
        return tuple(e for e in self._rounds if e.seq in wanted)

    def chains(self, digest: str, *, before: int | None = None, steps: int = 0) -> list[_Chain]:
        found: list[_Chain] = []
        for entry in self.completed:
            if entry.payload.get("onnx_sha256") == digest and (
                before is None or entry.seq < before
            ):
                rounds = self.rounds_of(entry)
                found.append(_Chain(entry, rounds, *_recorded(entry, rounds)))
        if steps >= MAX_STEPS:
            return found
        seen: set[tuple[str, Any, str]] = set()
        for entry in self.optimized:  # newest first
            if entry.payload.get("chosen_sha256") != digest:
                continue
            if before is not None and entry.seq >= before:
                continue
            source = entry.payload.get("source_onnx_sha256") or entry.payload.get("source_sha256")
            # A model optimized into itself (fp32 of an ONNX file) adds no step; the same
            # step recorded again adds no chain (only the newest is followed).
            if not isinstance(source, str) or source == digest:
                continue
            learnt, uncovered = _learnt_from(entry)
            if (source, entry.payload.get("chosen"), learnt) in seen:
                continue
            seen.add((source, entry.payload.get("chosen"), learnt))
            for chain in self.chains(source, before=entry.seq, steps=steps + 1):
                step: dict[str, Any] = {
                    "source_sha256": source,
                    "optimization_entry": _ref(entry),
                    "method": entry.payload.get("chosen"),
                    "learnt_from": learnt,
                }
                if chain.steps:
                    step["source_optimized_from"] = chain.steps[0]
                found.append(
                    _Chain(
                        chain.completed,
                        chain.rounds,
                        chain.epsilon,
                        chain.delta,
                        (step, *chain.steps),
                        uncovered or chain.uncovered,
                    )
                )
        return found


def _refuse_claim(chain: _Chain | None, *, model_sha256: str, stated: float | None) -> None:
    """Raise when ``stated`` (or its absence) is not what the ledger supports."""
    if chain is None:
        if stated is not None:
            raise UsageError(
                f"no federated run in this workspace's ledger produced model "
                f"{model_sha256[:12]} (nor a model 'insitu optimize' chose from one), so its "
                "card can make no privacy claim: drop --epsilon and --delta, or bundle the "
                "run's own model.onnx or the model optimized from it in this workspace"
            )
        return
    run = chain.completed.payload.get("run")
    what = f"federated run {run} of this model"
    if chain.steps:
        what = (
            f"federated run {run}, which this model was optimized from "
            f"({OPTIMIZED} entry {chain.steps[0]['optimization_entry']['seq']}),"
        )
    if chain.uncovered is not None:
        if stated is not None:
            raise UsageError(
                f"the epsilon of federated run {run} does not cover this model: "
                f"{chain.uncovered}; drop --epsilon and --delta, or optimize the run's model "
                "again (declaring --public-calibration only for public data)"
            )
        return
    if chain.epsilon is None:
        if stated is not None:
            raise UsageError(
                f"the ledger records {what} as trained without differential privacy; drop "
                "--epsilon and --delta: a card may not claim a guarantee its training did not give"
            )
        return
    if stated is None or stated < chain.epsilon:
        # Not a usage error: the command is well formed, the card it asks for would lie.
        raise UnderstatedPrivacyError(
            f"the ledger records {what} with epsilon {chain.epsilon:g}; state --epsilon "
            f"{chain.epsilon:g} (or more) and --delta for its card: a card may not understate "
            "the privacy cost"
        )


def provenance_for(
    ledger: Ledger,
    *,
    model_sha256: str,
    node: str,
    data_schema_sha256: str | None,
    stated_epsilon: float | None,
) -> dict[str, Any]:
    """The provenance of the model whose ONNX digest is ``model_sha256``.

    Returns the card's ``provenance``: ``node``, ``run`` (None when no federated run of
    this ledger produced the model), ``run_entry``, ``training_rounds``,
    ``epsilon_recorded`` and ``delta_recorded`` (None without DP), ``data_schema_sha256``
    and, for an optimized model, ``optimized_from``.

    Raises:
        UnderstatedPrivacyError: the stated epsilon is smaller than the ledger records
            for the run behind this model, or missing for a private run.
        UsageError: an epsilon is stated for a model with no provenance, trained without
            DP, or optimized on calibration records not declared public.

    """
    chains = _Resolver(ledger).chains(model_sha256)
    chain = max(chains, key=lambda c: (c.demand(), -len(c.steps))) if chains else None
    _refuse_claim(chain, model_sha256=model_sha256, stated=stated_epsilon)
    if chain is None:
        rounds = [_ref(e) for e in ledger.entries(event_type=_OTHER_TRAINING)]
        return {
            "node": node,
            "run": None,
            "training_rounds": rounds,
            "data_schema_sha256": data_schema_sha256,
        }
    provenance: dict[str, Any] = {
        "node": node,
        "run": chain.completed.payload.get("run"),
        "run_entry": _ref(chain.completed),
        "training_rounds": [_ref(e) for e in chain.rounds],
        "epsilon_recorded": chain.epsilon,
        "delta_recorded": chain.delta,
        "data_schema_sha256": data_schema_sha256,
    }
    if chain.steps:
        provenance["optimized_from"] = chain.steps[0]
    return provenance
