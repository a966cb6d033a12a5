"""The site side of a federation: a Flower ``NumPyClient`` that trains where the data is.

Each round, a site

1. opens its own workspace (its keys, its ledger, its sealed data);
2. takes the records it may use *at the time the round starts* (``SiteDataset.for_round``:
   consent applied, one row per data subject);
3. charges the round's privacy event to *those subjects* (``SubjectBudget``): for
   ``record`` privacy the DP-SGD event, for ``site`` privacy the aggregator's Gaussian
   mechanism on clipped updates. Subjects the event no longer fits are left out and
   counted; when none remain, the site refuses the round;
4. trains locally (DP-SGD with secret noise and sampling, or plain SGD), and returns its
   weights. With secure aggregation the ``secaggplus_mod`` masks them before they leave.

What leaves a site, and why each value is safe to send (``docs/federated.md``, threat
model): the (masked) weights; a fixed *weight* decided before the run
(:attr:`SitePlan.weight`, never the count of records used); the site's name; and this
run's epsilon, a function of the run's public settings. The training loss and the
counts of records stay in the site's own ledger. Evaluation sends, for ``record``
privacy and at the final round only, noisy counts of correct predictions and of
subjects (each subject counting once, by the share of their records predicted right),
charged to the held-out subjects; for ``site`` privacy nothing; without privacy, the
exact figures (nothing is claimed). When the schema declares sensitive attributes, the
final evaluation also sends the confusion counts per group of persons, released and
charged likewise as a release of its own (``insitu.federated._groups``).

The DP-SGD noise multiplier, sample rate and steps of a run are fixed by the site on the
run's first round (for the run's epsilon over its planned rounds) and kept in its
workspace: every round of the run is the same event, whatever the later exclusions.

A round the site trains again (its run was resumed from a checkpoint of an earlier
round) is charged again, like any use of the records: the run's epsilon at the site
then exceeds its target, and ``federation.site_round`` says which attempt it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.client import NumPyClient

from insitu._atomic import atomic_write_text
from insitu.audit import events
from insitu.data import DataSchema, SiteDataset, TrainingData, out_of_range, release_sha256
from insitu.errors import BudgetExceededError, FederationError, InsufficientDataError
from insitu.federated._config import FederationConfig
from insitu.federated._defaults import centered, uses_centering
from insitu.federated._groups import release_groups
from insitu.privacy import (
    PrivacyEvent,
    SecureRandom,
    SubjectBudget,
    calibrate_noise,
    rdp_noise_multiplier,
)
from insitu.training import (
    ModelFn,
    build_model,
    correct_per_row,
    evaluate,
    get_weights,
    planned_event,
    set_weights,
    train,
)
from insitu.workspace import Workspace

__all__ = [
    "RunEvents",
    "SiteClient",
    "SitePlan",
    "SiteRoundError",
    "evaluation_noise",
    "prepare_site_data",
]

logger = logging.getLogger(__name__)

#: Evaluation releases two counts (correct predictions, records): L2 sensitivity sqrt(2).
EVALUATION_SENSITIVITY = math.sqrt(2.0)


class SiteRoundError(FederationError):
    """A site did not contribute to a round; the message says which site and why.

    The coordinator reads ``[site NAME: REASON]`` at the start of the message Flower
    carries back (reason ``budget`` or ``error``); nothing else about the site is in it.
    """

    def __init__(self, site: str, reason: str, detail: str) -> None:
        super().__init__(f"[site {site}: {reason}] {detail}")
        self.site, self.reason = site, reason


@dataclass(frozen=True)
class SitePlan:
    """What one site needs to take part in a run (picklable, sent to simulation actors)."""

    run_id: str
    site: str
    home: Path
    train_dir: Path
    test_dir: Path
    dataset: str
    n_features: int
    config: FederationConfig
    site_noise_multiplier: float = 0.0
    model_fn: ModelFn | None = None
    #: The site's weight in the weighted mean, fixed before the run (simulation: the
    #: planned size of its part; deployment: what the operator declares, 1 by default).
    #: Sent instead of the number of records a round used, which would be a count
    #: released without noise. Site-level privacy always weighs sites equally.
    weight: int = 1
    #: Fault injection for tests of dropouts and poisoning: "raise:ROUND", "exit:ROUND"
    #: (the process dies mid-round) or "scale:FACTOR" (a poisoned, scaled update).
    fault: str = ""


@dataclass(frozen=True)
class RunEvents:
    """The privacy events of one run at one site, fixed on its first round."""

    training: PrivacyEvent
    rows_planned: int

    def to_json(self) -> dict[str, Any]:
        """As kept in ``runs/<run>.json``."""
        return {**self.training.to_json(), "rows_planned": self.rows_planned}


def prepare_site_data(
    ws: Workspace,
    frame: pd.DataFrame,
    schema: DataSchema,
    *,
    test_fraction: float,
    source: str,
) -> tuple[Path, Path]:
    """Prepare and seal a site's training and held-out records; returns their directories.

    The held-out records are chosen by their subject (a keyed hash with this site's
    secret), so the same people are held out whatever the file is called or its order.
    k=1: the prepared records never leave the site; k-anonymity is a property of
    releases ('insitu data prepare'), not of local training.
    """
    from insitu.data import Pseudonymizer, subject_tokens, token_uniform

    tokens = subject_tokens(frame, Pseudonymizer(ws.secret("pseudonym")), subject=schema.subject)
    is_test = token_uniform(tokens, part=0) < test_fraction
    train_dir = ws.prepared_part(schema.name, "train")
    test_dir = ws.prepared_part(schema.name, "test")
    for part, subset, out in (
        ("train", frame[~is_test], train_dir),
        ("test", frame[is_test], test_dir),
    ):
        SiteDataset.from_frame(
            ws,
            subset.reset_index(drop=True),
            schema,
            source=f"{source} ({part})",
            k=1,
            out=out,
        )
    return train_dir.absolute(), test_dir.absolute()


def evaluation_noise(config: FederationConfig) -> float:
    """Noise multiplier of the final evaluation's release (one Gaussian mechanism)."""
    return calibrate_noise(
        target_epsilon=config.evaluation_epsilon,
        delta=config.delta,
        sample_rate=1.0,
        steps=1,
    )


def _attempt(ledger: Any, run_id: str, round_number: int) -> dict[str, int]:
    """``{"attempt": n}`` when this site trained this round of the run before (n - 1 times).

    A resumed run trains again the rounds after its last checkpoint; each time is charged
    to the subjects again (a new ``privacy.spent``) and recorded as a new entry, never
    skipped nor written over: the attempt number says which time this is.
    """
    earlier = sum(
        1
        for e in ledger.entries(event_type=events.FEDERATION_SITE_ROUND.name)
        if e.payload.get("run") == run_id and e.payload.get("round") == round_number
    )
    return {"attempt": earlier + 1} if earlier else {}


class SiteClient(NumPyClient):
    """One site in one run."""

    def __init__(self, plan: SitePlan) -> None:
        self.plan = plan
        torch.set_num_threads(1)  # sites share the machine's cores in simulation

    def _model(self, parameters: list[np.ndarray]) -> torch.nn.Module:
        cfg = self.plan.config
        model = (
            self.plan.model_fn(self.plan.n_features)
            if self.plan.model_fn is not None
            else build_model(cfg.model, self.plan.n_features, hidden=cfg.hidden)
        )
        if self.plan.model_fn is None and uses_centering(cfg, model):
            model = centered(model)  # trained on inputs centred on their declared ranges
        set_weights(model, parameters)
        return model

    def _run_events(self, ws: Workspace, rows: int) -> RunEvents:
        """The run's DP-SGD event at this site (fixed on the run's first round).

        Calibrated so that the run's earlier events at this site (a schema inferred from
        the records) and all its planned rounds compose to the run's epsilon.
        """
        cfg = self.plan.config
        path = ws.run_events_path(self.plan.run_id)
        if path.exists():
            kept = json.loads(path.read_text())
            event = PrivacyEvent(kept["noise_multiplier"], kept["sample_rate"], kept["steps"])
            return RunEvents(event, int(kept["rows_planned"]))
        one_round = planned_event(
            rows=rows,
            batch_size=cfg.batch_for(rows),
            epochs=cfg.local_epochs,
            noise_multiplier=1.0,
        )
        # What the run already cost these records (a schema inferred from them) counts
        # towards the run's epsilon: the training gets the rest.
        with ws.ledger() as ledger:
            earlier = SubjectBudget.for_workspace(ws, ledger).run_events(self.plan.run_id)
        calibrate = calibrate_noise if cfg.accountant == "pld" else rdp_noise_multiplier
        sigma = calibrate(
            target_epsilon=cfg.epsilon,
            delta=cfg.delta,
            sample_rate=one_round.sample_rate,
            steps=one_round.steps * cfg.rounds,
            prior=earlier,
        )
        events = RunEvents(PrivacyEvent(sigma, one_round.sample_rate, one_round.steps), rows)
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(events.to_json()) + "\n")
        return events

    def _round_event(self, ws: Workspace, rows: int) -> PrivacyEvent | None:
        cfg = self.plan.config
        if cfg.privacy == "record":
            return self._run_events(ws, rows).training
        if cfg.privacy == "site":
            # The aggregator's Gaussian mechanism on this site's clipped update, once a
            # round (every site takes part in every round: sample rate 1).
            return PrivacyEvent(self.plan.site_noise_multiplier, 1.0, 1)
        return None

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train one round locally; see the module docstring."""
        round_number = int(config.get("round", 0))
        try:
            return self._fit(parameters, round_number)
        except BudgetExceededError as exc:
            raise SiteRoundError(self.plan.site, "budget", str(exc)) from exc
        except SiteRoundError:
            raise
        except Exception as exc:
            raise SiteRoundError(self.plan.site, "error", f"{type(exc).__name__}: {exc}") from exc

    def _charge(
        self, ws: Workspace, data: TrainingData, event: PrivacyEvent, *, round_number: int
    ) -> tuple[TrainingData, float, float]:
        """Charge ``event`` to the round's subjects; the admitted data and the epsilons."""
        cfg, plan = self.plan.config, self.plan
        with ws.ledger() as ledger:
            charge = SubjectBudget.for_workspace(ws, ledger).charge(
                data.subject_keys,
                event,
                mechanism="dp-sgd" if cfg.privacy == "record" else "dp-fedavg",
                run=plan.run_id,
                round=round_number,
                dataset=plan.dataset,
            )
        return (
            data.admitted(charge.admission.admitted),
            charge.epsilon_run,
            charge.epsilon_max_after,
        )

    def _fit(
        self, parameters: list[np.ndarray], round_number: int
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        cfg, plan = self.plan.config, self.plan
        ws = Workspace.open(plan.home)
        dataset = SiteDataset.open(ws, plan.train_dir)
        data = dataset.for_round(round_number=round_number)
        if not data.rows:
            raise InsufficientDataError(
                "no record of this site may be used for training: none has consent for the "
                "run's purpose (data.consent_applied in its ledger); record consent with "
                "'insitu consent', or declare another legal basis in the schema's [consent]"
            )
        # Values the encoder clips to the declared ranges: counted in the site's own record.
        outside = out_of_range(dataset.prepared.frame, dataset.schema)
        model = self._model(parameters)
        event = self._round_event(ws, max(data.subjects, 1))
        epsilon_run = epsilon_spent = 0.0
        if event is not None:
            data, epsilon_run, epsilon_spent = self._charge(
                ws, data, event, round_number=round_number
            )
        result = train(
            model,
            data.features,
            data.labels,
            groups=data.groups,
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_for(data.rows),
            learning_rate=cfg.local_learning_rate(),
            event=event if cfg.privacy == "record" else None,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed * 1000 + round_number,
        )
        weights = get_weights(model)
        with ws.ledger() as ledger:
            events.FEDERATION_SITE_ROUND.record(
                ledger,
                **_attempt(ledger, plan.run_id, round_number),
                run=plan.run_id,
                round=round_number,
                rows=data.rows,
                excluded_without_consent=data.excluded_without_consent,
                subjects=data.subjects,
                excluded_over_budget=data.excluded_over_budget,
                steps=result.steps,
                loss=round(result.loss, 6),
                privacy=cfg.privacy,
                epsilon_run=round(epsilon_run, 6),
                epsilon_spent_max=round(epsilon_spent, 6),
                **self._releases(),
                **({"out_of_range": outside} if outside else {}),
            )
        weights = self._inject_fault(round_number, parameters, weights)
        weight = 1 if cfg.privacy == "site" else plan.weight
        return weights, weight, {"site": plan.site, "epsilon_run": round(epsilon_run, 6)}

    def _releases(self) -> dict[str, list[str]]:
        """``{"releases": [...]}``: the digests of the sealed releases this run uses.

        They name the ``data.prepared`` entries of the training and held-out records, so
        a report counts this run's records, not every preparation the site ever made.
        """
        found = [release_sha256(d) for d in (self.plan.train_dir, self.plan.test_dir)]
        digests = [d for d in found if d is not None]
        return {"releases": digests} if digests else {}

    def _inject_fault(
        self, round_number: int, start: list[np.ndarray], weights: list[np.ndarray]
    ) -> list[np.ndarray]:
        kind, _, value = self.plan.fault.partition(":")
        if kind == "raise" and int(value) == round_number:
            raise RuntimeError(f"{self.plan.site}: injected failure in round {round_number}")
        if kind == "exit" and int(value) == round_number:
            os._exit(1)  # the site's process dies mid-round, without cleanup
        if kind == "scale":
            factor = float(value)
            return [s + factor * (w - s) for s, w in zip(start, weights, strict=True)]
        return weights

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """The global model on this site's held-out records; see the module docstring."""
        cfg, plan = self.plan.config, self.plan
        round_number = int(config.get("round", 0))
        ws = Workspace.open(plan.home)
        held_out = SiteDataset.open(ws, plan.test_dir)
        data = held_out.for_round(role="evaluation", round_number=round_number)
        if cfg.privacy == "none":
            model = self._model(parameters)
            loss, accuracy = evaluate(model, data.features, data.labels)
            by_group = self._groups(ws, held_out.schema, data, model, round_number)
            exact = {"correct": accuracy * data.rows, "count": data.rows}
            return loss, data.rows, {**exact, **by_group}
        if cfg.privacy == "site":
            raise SiteRoundError(plan.site, "error", "site-level privacy releases no evaluation")
        sigma = evaluation_noise(cfg)
        try:
            with ws.ledger() as ledger:
                charge = SubjectBudget.for_workspace(ws, ledger).charge(
                    data.subject_keys,
                    PrivacyEvent(sigma, 1.0, 1),
                    mechanism="evaluation",
                    run=plan.run_id,
                    round=round_number,
                    dataset=plan.dataset,
                )
        except BudgetExceededError as exc:
            raise SiteRoundError(plan.site, "budget", str(exc)) from exc
        data = data.admitted(charge.admission.admitted)
        # Per subject: the share of their records predicted right (in [0, 1]) and 1, so
        # that one subject moves each count by at most 1, however many records they have.
        model = self._model(parameters)
        right = correct_per_row(model, data.features, data.labels)
        groups = data.groups
        per_subject = np.bincount(groups, weights=right) / np.maximum(np.bincount(groups), 1)
        noise = SecureRandom().normal((2,), std=sigma * EVALUATION_SENSITIVITY)
        correct = float(per_subject.sum()) + float(noise[0])
        count = float(len(per_subject)) + float(noise[1])
        by_group = self._groups(ws, held_out.schema, data, model, round_number)
        return 0.0, plan.weight, {"correct": correct, "count": count, **by_group}

    def _groups(
        self,
        ws: Workspace,
        schema: DataSchema,
        data: TrainingData,
        model: torch.nn.Module,
        round_number: int,
    ) -> dict[str, float]:
        """Counts per group of persons at the run's final round (``insitu.federated._groups``)."""
        if round_number != self.plan.config.rounds:
            return {}
        return release_groups(
            ws,
            data,
            model,
            schema,
            self.plan.config,
            run=self.plan.run_id,
            round_number=round_number,
            dataset=self.plan.dataset,
        )
