"""The site side of a federation: a Flower ``NumPyClient`` that trains where the data is.

Each round, a site

1. opens its own workspace (its keys, its ledger, its sealed data);
2. takes the records it may use *at the time the round starts* (``SiteDataset.for_round``:
   consent applied, the count of exclusions recorded);
3. for ``record`` privacy, charges the round's DP-SGD event to its own budget for the
   data set, and refuses the round (raising :class:`~insitu.errors.BudgetExceededError`,
   which Flower reports as a failure and the federation survives) when the budget would
   be exceeded; for ``site`` privacy, charges the server's Gaussian mechanism on clipped
   updates;
4. trains locally (DP-SGD with Opacus, or plain SGD), and returns its weights. With
   secure aggregation the ``secaggplus_mod`` masks them before they leave.

The noise multiplier of a run is calibrated by the site itself on the first round of
the run (for the run's epsilon over its planned rounds) and kept in its workspace, so
every round of the run uses the same one.

Threat model (see ``docs/federated.md``): ``record`` protects every record from
everyone outside the site, including an aggregator that sees individual updates;
``site`` protects a whole site's contribution but trusts the aggregator to add the
noise; secure aggregation hides individual updates from the aggregator (honest but
curious, with fewer than the reconstruction threshold of colluding sites).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.client import NumPyClient

from insitu._atomic import atomic_write_text
from insitu.data import DataSchema, SiteDataset
from insitu.federated._config import FederationConfig
from insitu.federated._local import evaluate, planned_event, train
from insitu.federated._models import (
    ModelFn,
    build_model,
    get_weights,
    set_weights,
    weights_digest,
)
from insitu.privacy import PrivacyEvent, SiteBudget, calibrate_noise
from insitu.workspace import Workspace

__all__ = ["SiteClient", "SitePlan", "prepare_site_data", "site_budget"]

logger = logging.getLogger(__name__)


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
    #: Fault injection for tests of dropouts and poisoning: "raise:ROUND", "exit:ROUND"
    #: (the process dies mid-round) or "scale:FACTOR" (a poisoned, scaled update).
    fault: str = ""


def prepare_site_data(
    ws: Workspace, frame: pd.DataFrame, schema: DataSchema, *, is_test: np.ndarray, source: str
) -> tuple[Path, Path]:
    """Prepare and seal a site's training and held-out records; returns their directories.

    k=1: the prepared records never leave the site; k-anonymity is a property of
    releases ('insitu data prepare'), not of local training.
    """
    base = ws.home / "prepared" / schema.name
    for part, subset in (("train", frame[~is_test]), ("test", frame[is_test])):
        SiteDataset.from_frame(
            ws,
            subset.reset_index(drop=True),
            schema,
            source=f"{source} ({part})",
            k=1,
            out=base / part,
        )
    return (base / "train").absolute(), (base / "test").absolute()


def site_budget(ws: Workspace, ledger: Any, dataset: str) -> SiteBudget:
    """The budget of ``dataset`` at the site of ``ws``, as configured there."""
    return SiteBudget(
        ledger,
        dataset,
        epsilon_budget=float(ws.config.get("privacy", "epsilon_budget")),
        delta=float(ws.config.get("privacy", "delta")),
        lock=ws.home / "privacy.lock",
    )


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
        set_weights(model, parameters)
        return model

    def _record_noise(self, ws: Workspace, rows: int) -> float:
        """The run's DP-SGD noise multiplier at this site (calibrated once per run)."""
        cfg = self.plan.config
        path = ws.home / "runs" / f"{self.plan.run_id}.json"
        if path.exists():
            return float(json.loads(path.read_text())["noise_multiplier"])
        one_round = planned_event(
            rows=rows, batch_size=cfg.batch_size, epochs=cfg.local_epochs, noise_multiplier=1.0
        )
        sigma = calibrate_noise(
            target_epsilon=cfg.epsilon,
            delta=cfg.delta,
            sample_rate=one_round.sample_rate,
            steps=one_round.steps * cfg.rounds,
        )
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps({"noise_multiplier": sigma, "rows": rows}) + "\n")
        return sigma

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train one round locally; see the module docstring."""
        cfg, plan = self.plan.config, self.plan
        round_number = int(config.get("round", 0))
        ws = Workspace.open(plan.home)
        data = SiteDataset.open(ws, plan.train_dir).for_round(round_number=round_number)
        model = self._model(parameters)
        event: PrivacyEvent | None = None
        epsilon = 0.0
        with ws.ledger() as ledger:
            if cfg.privacy == "record":
                sigma = self._record_noise(ws, max(data.rows, 1))
                event = planned_event(
                    rows=max(data.rows, 1),
                    batch_size=cfg.batch_size,
                    epochs=cfg.local_epochs,
                    noise_multiplier=sigma,
                )
            elif cfg.privacy == "site":
                # The server's Gaussian mechanism on this site's clipped update, once a round
                # (every site is sampled every round: sample rate 1).
                site_event = PrivacyEvent(plan.site_noise_multiplier, 1.0, 1)
            budget_event = (
                event
                if cfg.privacy == "record"
                else (site_event if cfg.privacy == "site" else None)
            )
            if budget_event is not None:
                charge = site_budget(ws, ledger, plan.dataset).charge(
                    budget_event,
                    run=plan.run_id,
                    round=round_number,
                    mechanism=f"{cfg.privacy}-level",
                )
                epsilon = charge.epsilon_after
        result = train(
            model,
            data.features,
            data.labels,
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            event=event,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed * 1000 + round_number,
        )
        weights = get_weights(model)
        with ws.ledger() as ledger:
            ledger.record(
                "federation.site_round",
                run=plan.run_id,
                round=round_number,
                rows=data.rows,
                excluded_without_consent=data.excluded_without_consent,
                steps=result.steps,
                loss=round(result.loss, 6),
                privacy=cfg.privacy,
                epsilon_spent_total=round(epsilon, 6),
            )
        weights = self._inject_fault(round_number, parameters, weights)
        metrics = {
            "site": plan.site,
            "epsilon": epsilon,
            "loss": result.loss,
            "update_digest": weights_digest(weights)[:16],
        }
        return weights, result.examples, metrics

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
        """Loss and accuracy of the global model on this site's held-out records."""
        ws = Workspace.open(self.plan.home)
        data = SiteDataset.open(ws, self.plan.test_dir).for_round(
            role="evaluation", round_number=int(config.get("round", 0))
        )
        loss, accuracy = evaluate(self._model(parameters), data.features, data.labels)
        return loss, data.rows, {"accuracy": accuracy}
