"""The aggregator side: a Flower strategy chosen by the run's settings, and its recorder.

Aggregation (``flwr.server.strategy``, Flower's legacy strategy API, because SecAgg+ in
Flower 1.41 runs only through ``LegacyContext``):

* ``FedAvg`` by default; ``FedTrimmedAvg`` (beta 0.2) or ``FedMedian`` with ``--robust``,
  which need individual updates and so exclude secure aggregation;
* for ``site`` privacy, wrapped in ``DifferentialPrivacyClientSideFixedClipping``: sites
  clip their update (``fixedclipping_mod``), the server adds Gaussian noise to the mean;
* with secure aggregation, run through ``SecAggPlusWorkflow``: the strategy receives
  only the unmasked *sum* (every result carries the same aggregate parameters).

:class:`RoundRecorder` wraps whatever strategy is chosen: it numbers rounds in the
configuration sent to sites, records each round in the coordinator's ledger, keeps what
the strategy was handed (digests only, for the secure-aggregation test), and stops the
run with a clear error when fewer sites than required took part.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)

from insitu.errors import FederationError
from insitu.federated._config import FederationConfig
from insitu.federated._models import weights_digest

__all__ = [
    "RoundRecord",
    "RoundRecorder",
    "build_strategy",
    "record_completed",
    "run_rounds",
]

logger = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What happened in one round."""

    round: int
    sites_ok: int = 0
    failures: int = 0
    epsilon_by_site: dict[str, float] = field(default_factory=dict)
    site_update_digests: list[str] = field(default_factory=list)
    seen_by_strategy: list[str] = field(default_factory=list)
    accuracy: float | None = None
    loss: float | None = None
    central_accuracy: float | None = None
    central_loss: float | None = None


def build_strategy(
    config: FederationConfig,
    initial: Parameters,
    *,
    evaluate_fn: Callable[
        [int, list[np.ndarray], dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None
    ]
    | None,
    site_noise_multiplier: float,
) -> Strategy:
    """The aggregation strategy of a run (see the module docstring)."""
    common: dict[str, Any] = {
        "fraction_fit": 1.0,
        "fraction_evaluate": 1.0,
        "min_fit_clients": config.required_sites,
        "min_evaluate_clients": config.required_sites,
        "min_available_clients": config.sites,
        "initial_parameters": initial,
        "evaluate_fn": evaluate_fn,
        "accept_failures": True,
        # Sites' metrics are read by RoundRecorder; Flower's own aggregation of them is unused.
        "fit_metrics_aggregation_fn": lambda _: {},
        "evaluate_metrics_aggregation_fn": lambda _: {},
    }
    strategy: Strategy
    if config.robust == "trimmed-mean":
        strategy = FedTrimmedAvg(beta=0.2, **common)
    elif config.robust == "median":
        strategy = FedMedian(**common)
    else:
        strategy = FedAvg(**common)
    if config.privacy == "site":
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=site_noise_multiplier,
            clipping_norm=config.site_clip_norm,
            num_sampled_clients=config.sites,
        )
    return strategy


class RoundRecorder(Strategy):
    """Delegates to ``inner``; numbers rounds, records them, enforces the site minimum."""

    def __init__(
        self,
        inner: Strategy,
        *,
        required_sites: int,
        on_round: Callable[[RoundRecord], None],
    ) -> None:
        super().__init__()
        self.inner = inner
        self.required_sites = required_sites
        self.on_round = on_round
        self.records: dict[int, RoundRecord] = {}

    def __repr__(self) -> str:
        return f"RoundRecorder({self.inner!r})"

    def _record(self, server_round: int) -> RoundRecord:
        return self.records.setdefault(server_round, RoundRecord(server_round))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate."""
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate, and tell every site the round number."""
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config["round"] = server_round
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the site minimum, note what the strategy is handed, then delegate."""
        record = self._record(server_round)
        record.sites_ok, record.failures = len(results), len(failures)
        for _, res in results:
            record.seen_by_strategy.append(
                weights_digest(parameters_to_ndarrays(res.parameters))[:16]
            )
            metrics = res.metrics or {}
            if "update_digest" in metrics:
                record.site_update_digests.append(str(metrics["update_digest"]))
            if "site" in metrics:
                record.epsilon_by_site[str(metrics["site"])] = float(metrics.get("epsilon", 0.0))
        if len(results) < self.required_sites:
            raise FederationError(
                f"round {server_round}: {len(results)} site(s) returned an update, "
                f"{self.required_sites} required ({len(failures)} failed or refused); "
                "see each site's ledger (privacy.budget_refused) or lower --min-sites"
            )
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate, and tell every site the round number."""
        instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config["round"] = server_round
        return instructions

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Weighted accuracy over the sites' held-out records; closes the round."""
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, failures)
        total = sum(res.num_examples for _, res in results)
        record = self._record(server_round)
        if total:
            record.accuracy = (
                sum(
                    float(res.metrics.get("accuracy", 0.0)) * res.num_examples for _, res in results
                )
                / total
            )
        record.loss = loss
        self.on_round(record)
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Central evaluation (simulation only: a held-out part of the file)."""
        result = self.inner.evaluate(server_round, parameters)
        if result is not None and server_round > 0:
            record = self._record(server_round)
            record.central_loss, metrics = result[0], result[1]
            record.central_accuracy = float(metrics.get("accuracy", 0.0))
        return result


def run_rounds(
    grid: Any, context: Any, config: FederationConfig, strategy: Strategy
) -> list[np.ndarray]:
    """Run ``config.rounds`` rounds of ``strategy`` on Flower's legacy workflow.

    The one server loop of simulation and deployment: with secure aggregation the fit
    stage is Flower's ``SecAggPlusWorkflow`` (every share with up to 10 sites, half
    beyond; 60% of the shares reconstruct a dropped site's mask). Returns the final
    global weights.
    """
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy
    )
    fit_workflow = (
        SecAggPlusWorkflow(
            num_shares=1.0 if config.sites <= 10 else 0.5,
            reconstruction_threshold=0.6,
            clipping_range=config.secagg_clipping_range,
            max_weight=1e6,
        )
        if config.secure_aggregation
        else None
    )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    arrays = legacy.state.array_records["parameters"]
    return [a.numpy() for a in arrays.values()]


def record_completed(
    ledger: Any,
    *,
    run_id: str,
    rounds: int,
    central_accuracy: float | None,
    weights: list[np.ndarray],
    onnx: bytes,
) -> None:
    """Record ``federation.completed``: digests of the model and the run's round entries."""
    entries = ledger.entries(event_type="federation.round")
    ledger.record(
        "federation.completed",
        run=run_id,
        rounds=rounds,
        central_accuracy=central_accuracy,
        model_sha256=weights_digest(weights),
        onnx_sha256=hashlib.sha256(onnx).hexdigest(),
        round_entries=[e.seq for e in entries if e.payload.get("run") == run_id],
    )
