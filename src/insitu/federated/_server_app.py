"""The aggregator side: a Flower strategy chosen by the run's settings, and its recorder.

Aggregation (``flwr.server.strategy``, Flower's legacy strategy API, because SecAgg+ in
Flower 1.41 runs only through ``LegacyContext``):

* ``FedAvg`` by default, weighted by the weights sites declared before the run (never
  by counts of records); ``FedTrimmedAvg`` (beta 0.2) or ``FedMedian`` with
  ``--robust``, which need individual updates and so exclude secure aggregation;
* for ``site`` privacy, wrapped in :class:`SiteLevelDP`: sites clip their update
  (Flower's ``fixedclipping_mod``) and weigh 1 each, the aggregator adds secret Gaussian
  noise to the *unweighted* mean, scaled to the number of sites it actually averaged;
* with secure aggregation, run through ``SecAggPlusWorkflow``: the strategy receives
  only the unmasked *sum* (every result carries the same aggregate parameters).

:class:`RoundRecorder` wraps whatever strategy is chosen: it numbers rounds in the
configuration sent to sites, asks for site evaluation only where it is private (the
final round, record-level privacy) or nothing is claimed, records each round in the
coordinator's ledger, and stops the run (:class:`~insitu.errors.RoundFailedError`)
at the first round that aggregated fewer sites than required, naming each missing site
and why (budget, error, dropout): a run never continues, or presents a model, past a
round it could not complete.
"""

from __future__ import annotations

import hashlib
import logging
import re
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
from flwr.server.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy

from insitu.audit import events
from insitu.errors import RoundFailedError
from insitu.federated._config import MAX_SITE_WEIGHT, FederationConfig
from insitu.privacy import SecureRandom
from insitu.training import weights_digest

__all__ = [
    "RoundRecord",
    "RoundRecorder",
    "SiteLevelDP",
    "build_strategy",
    "record_completed",
    "record_failed",
    "run_rounds",
]

#: What a site's refusal carries back (``SiteRoundError``): its name and the reason.
_SITE_REASON = re.compile(r"\[site (?P<site>[^:\]]+): (?P<reason>budget|error)\]")

logger = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What happened in one round."""

    round: int
    sites_ok: int = 0
    failures: int = 0
    #: This run's epsilon at each site that contributed (not the site's lifetime total).
    epsilon_by_site: dict[str, float] = field(default_factory=dict)
    #: Sites that did not contribute, with the reason: budget, error or dropout.
    missing: dict[str, str] = field(default_factory=dict)
    seen_by_strategy: list[str] = field(default_factory=list)
    aggregated: bool = False
    accuracy: float | None = None
    sites_evaluated: int = 0
    loss: float | None = None
    central_accuracy: float | None = None
    central_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The round as JSON (results, records, the ledger's ``federation.round``)."""
        return {
            "round": self.round,
            "sites_ok": self.sites_ok,
            "failures": self.failures,
            "missing": self.missing,
            "accuracy": self.accuracy,
            "sites_evaluated": self.sites_evaluated,
            "central_accuracy": self.central_accuracy,
            "loss": self.loss,
            "epsilon_by_site": self.epsilon_by_site,
        }


class SiteLevelDP(Strategy):
    """DP-FedAvg (McMahan et al. 2018) with client-side clipping, correct for unequal sites.

    Flower's ``DifferentialPrivacyClientSideFixedClipping`` adds noise of standard
    deviation ``sigma * C / m`` to whatever mean the inner strategy forms, with ``m``
    fixed in advance, drawing it from NumPy's global generator. Two things break the
    guarantee: a mean weighted by example counts gives a large site more than ``C / m``
    influence (claimed epsilon 1 was 2.16 for the largest Dirichlet site), and a round
    that averages fewer than ``m`` sites needs more noise. Here every site weighs 1
    (``SiteClient`` sends weight 1 under site-level privacy, and this wrapper checks
    it), the noise is scaled to the number of sites actually averaged, and it is drawn
    from :class:`~insitu.privacy.SecureRandom`.
    """

    def __init__(self, inner: Strategy, *, noise_multiplier: float, clipping_norm: float) -> None:
        super().__init__()
        if noise_multiplier <= 0 or clipping_norm <= 0:
            raise ValueError("site-level DP needs a positive noise multiplier and clipping norm")
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self._random = SecureRandom()

    def __repr__(self) -> str:
        return f"SiteLevelDP({self.inner!r}, sigma={self.noise_multiplier})"

    def noise_std(self, sites: int) -> float:
        """Standard deviation of the noise on a mean of ``sites`` clipped updates."""
        return self.noise_multiplier * self.clipping_norm / sites

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate."""
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate, and send the clipping norm ``fixedclipping_mod`` applies."""
        from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config[KEY_CLIPPING_NORM] = self.clipping_norm
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The unweighted mean of the clipped updates, plus noise for that many sites."""
        from flwr.common import ndarrays_to_parameters

        if not results:
            return None, {}
        if any(res.num_examples != 1 for _, res in results):
            raise RoundFailedError(
                f"round {server_round}: a site sent a weight other than 1 under site-level "
                "privacy; its update would count for more than the noise covers",
                round_number=server_round,
                sites={},
            )
        aggregated, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if aggregated is None:
            return None, metrics
        std = self.noise_std(len(results))
        noisy = [
            (a + self._random.normal(a.shape, std=std)).astype(a.dtype)
            for a in parameters_to_ndarrays(aggregated)
        ]
        return ndarrays_to_parameters(noisy), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No site evaluation: it would release figures outside the site-level mechanism."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate (central evaluation, simulation only)."""
        return self.inner.evaluate(server_round, parameters)


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
        strategy = SiteLevelDP(
            strategy, noise_multiplier=site_noise_multiplier, clipping_norm=config.site_clip_norm
        )
    return strategy


class RoundRecorder(Strategy):
    """Delegates to ``inner``; numbers rounds, records them, stops at a failed round."""

    def __init__(
        self,
        inner: Strategy,
        *,
        config: FederationConfig,
        on_round: Callable[[RoundRecord], None],
        site_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.config = config
        self.required_sites = config.required_sites
        self.on_round = on_round
        self.site_names = list(site_names or [])
        self.records: dict[int, RoundRecord] = {}
        self._site_of_node: dict[str, str] = {}

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

    def _missing(self, contributed: set[str], failures: list[Any]) -> dict[str, str]:
        """Sites that did not contribute, each with its reason (budget, error, dropout)."""
        missing: dict[str, str] = {}
        for failure in failures:
            match = _SITE_REASON.search(str(failure))
            if match and match["site"] not in contributed:
                missing[match["site"]] = match["reason"]
        for name in self.site_names:
            if name not in contributed and name not in missing:
                missing[name] = "dropout"
        unnamed = len({str(f) for f in failures if not _SITE_REASON.search(str(f))})
        for index in range(unnamed if not self.site_names else 0):
            missing[f"unnamed site {index + 1}"] = "error"
        return missing

    def fail_round(self, server_round: int, failures: list[Any]) -> None:
        """Stop the run: ``server_round`` aggregated fewer sites than required."""
        record = self._record(server_round)
        record.missing = self._missing(set(record.epsilon_by_site), failures)
        what = ", ".join(f"{site} ({reason})" for site, reason in sorted(record.missing.items()))
        raise RoundFailedError(
            f"round {server_round} of {self.config.rounds}: {record.sites_ok} site(s) "
            f"contributed, {self.required_sites} required; missing: {what or 'unknown'}. "
            "No model is the result of this run. Each site's ledger says more "
            "(privacy.budget_refused, federation.site_round)",
            round_number=server_round,
            sites=record.missing,
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the site minimum, note what the strategy is handed, then delegate."""
        record = self._record(server_round)
        record.sites_ok, record.failures = len(results), len(failures)
        for proxy, res in results:
            record.seen_by_strategy.append(
                weights_digest(parameters_to_ndarrays(res.parameters))[:16]
            )
            metrics = res.metrics or {}
            if "site" in metrics:
                site = str(metrics["site"])
                self._site_of_node[str(proxy.cid)] = site
                record.epsilon_by_site[site] = float(metrics.get("epsilon_run", 0.0))
        if len(results) < self.required_sites:
            self.fail_round(server_round, list(failures))
        record.missing = self._missing(set(record.epsilon_by_site), list(failures))
        aggregated = self.inner.aggregate_fit(server_round, results, failures)
        record.aggregated = aggregated[0] is not None
        return aggregated

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Site evaluation where it is private or nothing is claimed; round numbers."""
        record = self.records.get(server_round)
        if record is None or not record.aggregated:
            # SecAgg+ halted before aggregation (too few sites answered a stage).
            self.fail_round(server_round, [])
        final = server_round == self.config.rounds
        if self.config.privacy == "record" and not final:
            instructions: list[tuple[ClientProxy, EvaluateIns]] = []
        else:
            instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config["round"] = server_round
        if not instructions:
            self.on_round(self._record(server_round))
        return instructions

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Accuracy over the sites' (noisy, for private runs) counts; closes the round."""
        record = self._record(server_round)
        correct = sum(float(res.metrics.get("correct", 0.0)) for _, res in results)
        count = sum(float(res.metrics.get("count", 0.0)) for _, res in results)
        record.sites_evaluated = len(results)
        if results and count > 0:
            record.accuracy = min(1.0, max(0.0, correct / count))
        if self.config.privacy == "none" and results:
            loss, _ = self.inner.aggregate_evaluate(server_round, results, failures)
            record.loss = loss
        self.on_round(record)
        return record.loss, {}

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
    grid: Any, context: Any, config: FederationConfig, strategy: RoundRecorder
) -> list[np.ndarray]:
    """Run ``config.rounds`` rounds of ``strategy`` on Flower's legacy workflow.

    The one server loop of simulation and deployment: with secure aggregation the fit
    stage is Flower's ``SecAggPlusWorkflow`` (every share with up to 10 sites, half
    beyond; 60% of the shares reconstruct a dropped site's mask; site weights of at most
    :data:`~insitu.federated._config.MAX_SITE_WEIGHT`). Returns the final global weights.

    Raises:
        RoundFailedError: a round aggregated fewer sites than required (the run stops
            there; a round that SecAgg+ halted counts as such).

    """
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

    class RecordedSecAggPlus(SecAggPlusWorkflow):
        """SecAgg+ whose halts are failed rounds, with the failures sites sent back."""

        def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
            self.last_state = state
            return bool(super().setup_stage(grid, context, state))

        def __call__(self, grid: Any, context: Any) -> None:
            super().__call__(grid, context)
            current = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
            record = strategy.records.get(current)
            if record is None or not record.aggregated:
                strategy.fail_round(current, list(self.last_state.failures))

    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy
    )
    fit_workflow = (
        RecordedSecAggPlus(
            num_shares=1.0 if config.sites <= 10 else 0.5,
            reconstruction_threshold=0.6,
            clipping_range=config.secagg_clipping_range,
            max_weight=float(MAX_SITE_WEIGHT),
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
    epsilon_run: float | None,
    delta: float | None,
) -> None:
    """Record ``federation.completed``: the model's digests, this run's privacy, its rounds.

    ``epsilon_run`` is the most any site spent on one record in *this* run (``None``
    without privacy): what a model card built from this run must state at least.
    """
    entries = ledger.entries(event_type="federation.round")
    events.FEDERATION_COMPLETED.record(
        ledger,
        run=run_id,
        rounds=rounds,
        central_accuracy=central_accuracy,
        model_sha256=weights_digest(weights),
        onnx_sha256=hashlib.sha256(onnx).hexdigest(),
        epsilon_run=epsilon_run,
        delta=delta,
        round_entries=[e.seq for e in entries if e.payload.get("run") == run_id],
    )


def record_failed(ledger: Any, *, run_id: str, error: BaseException) -> None:
    """Record ``federation.failed``: the run has no model; the round and sites, if known."""
    round_number = getattr(error, "round", None)
    events.FEDERATION_FAILED.record(
        ledger,
        run=run_id,
        round=round_number,
        sites=getattr(error, "sites", {}),
        reason=str(error)[:500],
    )
