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
  only the unmasked *sum* (every result carries the same aggregate parameters);
* outermost, the server optimizer (FedAdam by default, ``--server-optimizer``): a step
  from the current model along the aggregate, post-processing at no privacy cost
  (:mod:`insitu.federated._defaults`), in simulation and deployment alike.

:class:`RoundRecorder` wraps whatever strategy is chosen: it numbers rounds in the
configuration sent to sites, asks for site evaluation only where it is private (the
final round, record-level privacy) or nothing is claimed, records each round in the
coordinator's ledger, and stops the run (:class:`~insitu.errors.RoundFailedError`)
at the first round that aggregated fewer sites than required, naming each missing site
and why (budget, error, dropout): a run never continues, or presents a model, past a
round it could not complete.

Rounds that survive a lost site: a round completes with the sites that answered when
they reach the quorum (``FederationConfig.required_sites``); its record names the sites
that took part (``participants``: name and Flower node id), the sites lost (``missing``,
with the reason) and the sites whose evaluation failed (``evaluation_missing``). The
first round of a run waits for every site; later rounds go on with the quorum, so a
site whose node went away for good does not stall the run. After each completed round
the recorder writes a :class:`~insitu.federated._checkpoint.Checkpoint` (when given a
directory), so that a run that stops can be resumed from its last good round: a resumed
run starts at round ``k + 1`` and numbers every round as the run does (the sites, the
SecAgg+ messages and the ledger see the real round numbers).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
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
from insitu.federated._checkpoint import CHECKPOINT_NAME, Checkpoint
from insitu.federated._config import (
    MAX_SITE_WEIGHT,
    SECAGG_RECONSTRUCTION,
    FederationConfig,
    secagg_share_fraction,
    secagg_threshold,
)
from insitu.federated._defaults import wrap as wrap_server_optimizer
from insitu.federated._groups import GroupSums, sum_groups
from insitu.privacy import SecureRandom
from insitu.training import weights_digest

__all__ = [
    "RESUMED_WAIT_SECONDS",
    "RoundRecord",
    "RoundRecorder",
    "SiteLevelDP",
    "build_strategy",
    "record_checkpointed",
    "record_completed",
    "record_failed",
    "record_resumed",
    "record_round",
    "run_rounds",
    "secagg_settings",
]

#: What a site's refusal carries back (``SiteRoundError``): its name and the reason.
_SITE_REASON = re.compile(r"\[site (?P<site>[^:\]]+): (?P<reason>budget|error)\]")
#: What to look at for each reason a site was lost (the failed round's message).
_HINTS = {
    "budget": "budget, privacy.budget_refused in the site's ledger",
    "dropout": "dropout, the site's process and its network (no reply came)",
    "error": "error, the site's output (federation.site_round in its ledger)",
}


def _node(cid: str) -> str:
    """The name of a site known only by its Flower node id (``node_<id>``).

    The underscore keeps the id one token: a bare run of 16 to 19 digits passes the Luhn
    check one time in ten, and the ledger refuses what looks like a card number.
    """
    return f"node_{cid}"


#: Flower's own wait for sites (a day): the first round of a new run waits for all.
_WAIT_ALL_SECONDS = 86_400
#: How long the first round of a resumed run waits for every site before going on with
#: the quorum (sites reconnect to a restarted server on their own schedule).
RESUMED_WAIT_SECONDS = 300

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
    #: Sites whose update the round aggregated: name -> Flower node id (an integer: a
    #: long digit string could pass for a card number in the ledger's payload check).
    participants: dict[str, int] = field(default_factory=dict)
    seen_by_strategy: list[str] = field(default_factory=list)
    aggregated: bool = False
    accuracy: float | None = None
    #: Sites whose evaluation the accuracy covers.
    sites_evaluated: int = 0
    #: Sites asked to evaluate that did not answer, with the reason.
    evaluation_missing: dict[str, str] = field(default_factory=dict)
    loss: float | None = None
    central_accuracy: float | None = None
    central_loss: float | None = None
    #: The sites' counts per group of persons, summed (final evaluation; not checkpointed).
    groups: GroupSums | None = None
    #: Sites whose evaluation the round received.
    evaluated: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The round as JSON (results, records, checkpoints)."""
        return {
            "round": self.round,
            "sites_ok": self.sites_ok,
            "failures": self.failures,
            "missing": self.missing,
            "participants": self.participants,
            "accuracy": self.accuracy,
            "sites_evaluated": self.sites_evaluated,
            "evaluation_missing": self.evaluation_missing,
            "central_accuracy": self.central_accuracy,
            "loss": self.loss,
            "epsilon_by_site": self.epsilon_by_site,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """A round recorded by :meth:`to_json` (a checkpoint's history)."""
        return cls(
            round=int(data["round"]),
            sites_ok=int(data["sites_ok"]),
            failures=int(data["failures"]),
            epsilon_by_site={str(k): float(v) for k, v in data["epsilon_by_site"].items()},
            missing=dict(data.get("missing", {})),
            participants={str(k): int(v) for k, v in data.get("participants", {}).items()},
            aggregated=True,
            accuracy=data.get("accuracy"),
            sites_evaluated=int(data.get("sites_evaluated", 0)),
            evaluation_missing=dict(data.get("evaluation_missing", {})),
            loss=data.get("loss"),
            central_accuracy=data.get("central_accuracy"),
        )

    def ledger_payload(self) -> dict[str, Any]:
        """``federation.round`` (without the run): who took part, who was lost, the figures."""
        return {
            "round": self.round,
            "sites_ok": self.sites_ok,
            "failures": self.failures,
            "participants": self.participants,
            "missing": self.missing,
            "sites_evaluated": self.sites_evaluated,
            "evaluation_missing": self.evaluation_missing,
            "accuracy": self.accuracy,
            "central_accuracy": self.central_accuracy,
            "epsilon_run_max": max(self.epsilon_by_site.values(), default=0.0),
        }

    def summary(self, sites: int) -> str:
        """One progress line: sites, who was lost, accuracy and what it covers, epsilon.

        A figure that was not measured is printed as such, never as 0.
        """
        lost = ", ".join(f"{s} {r}" for s, r in sorted(self.missing.items()))
        asked = self.sites_evaluated + len(self.evaluation_missing)
        if self.accuracy is not None:
            accuracy = f"accuracy {self.accuracy:.4f} on {self.sites_evaluated} of {asked} sites"
        elif asked:
            accuracy = f"accuracy - (0 of {asked} sites evaluated)"
        else:
            accuracy = "accuracy - (not evaluated this round)"
        central = (
            ""
            if self.central_accuracy is None
            else f", held-out accuracy {self.central_accuracy:.4f}"
        )
        epsilon = max(self.epsilon_by_site.values(), default=0.0)
        return (
            f"{self.sites_ok} of {sites} sites"
            + (f" (lost: {lost})" if lost else "")
            + f", {accuracy}{central}, epsilon this run {epsilon:.3f}"
        )


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
    """The aggregation strategy of a run (see the module docstring).

    Every available site is asked each round (fractions 1.0); a round goes on once the
    quorum is available (:class:`RoundRecorder` makes the first round wait for all).
    """
    common: dict[str, Any] = {
        "fraction_fit": 1.0,
        "fraction_evaluate": 1.0,
        "min_fit_clients": config.required_sites,
        "min_evaluate_clients": config.required_sites,
        "min_available_clients": config.required_sites,
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
    # Outermost: FedAdam/FedYogi post-process the (noised) aggregate (insitu.federated._defaults).
    return wrap_server_optimizer(strategy, config, initial)


def secagg_settings(config: FederationConfig) -> dict[str, Any]:
    """The run's SecAgg+ parameters (``{}`` without secure aggregation).

    ``num_shares`` and ``reconstruction_threshold`` are what ``SecAggPlusWorkflow``
    receives (fractions of the sites sampled); ``threshold_sites`` is the count they
    come to for all the run's sites (Flower's rule, ``insitu.federated._config``).
    """
    if not config.secure_aggregation:
        return {}
    return {
        "num_shares": secagg_share_fraction(config.sites),
        "reconstruction_threshold": SECAGG_RECONSTRUCTION,
        "threshold_sites": secagg_threshold(config.sites),
        "clipping_range": config.secagg_clipping_range,
        "max_weight": float(MAX_SITE_WEIGHT),
    }


class RoundRecorder(Strategy):
    """Delegates to ``inner``; numbers rounds, records them, stops at a failed round.

    ``site_names``: the sites every round expects (simulation); without them, the sites
    seen in an earlier round of the run are expected. ``checkpoint_dir``: where
    ``checkpoint.npz`` is written after each round (``on_checkpoint`` then receives it
    and its SHA-256). ``resume_from``: the checkpoint of the run's last good round; the
    run goes on at the round after it, with its history. ``node_names``: Flower node id
    -> site name, when the server knows it (deployment: the keys it registered), so that
    a site lost before it ever answered is still named.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        config: FederationConfig,
        on_round: Callable[[RoundRecord], None],
        site_names: list[str] | None = None,
        run_id: str = "",
        checkpoint_dir: Path | None = None,
        on_checkpoint: Callable[[Checkpoint, str], None] | None = None,
        resume_from: Checkpoint | None = None,
        node_names: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.config = config
        self.required_sites = config.required_sites
        self.on_round = on_round
        self.site_names = list(site_names or [])
        self.run_id = run_id
        self.checkpoint_dir = checkpoint_dir
        self.on_checkpoint = on_checkpoint
        self.records: dict[int, RoundRecord] = {}
        #: Rounds completed before this process (a resumed run's history).
        self.earlier: list[RoundRecord] = []
        self.first_round = 1
        #: The last checkpoint written or resumed from: its round and path.
        self.checkpointed: tuple[int, Path] | None = None
        self._closed: list[int] = []
        self._latest: list[np.ndarray] | None = None
        self._site_of_node: dict[str, str] = dict(node_names or {})
        self._expected: set[str] = set(self.site_names)
        self._asked: dict[tuple[str, int], set[str]] = {}
        if resume_from is not None:
            self.earlier = [RoundRecord.from_json(r) for r in resume_from.history]
            self.first_round = resume_from.round + 1
            self._latest = resume_from.weights
            for record in self.earlier:
                self._expected.update(record.participants)
            if checkpoint_dir is not None:
                self.checkpointed = (resume_from.round, checkpoint_dir / CHECKPOINT_NAME)

    def __repr__(self) -> str:
        return f"RoundRecorder({self.inner!r})"

    def _record(self, server_round: int) -> RoundRecord:
        return self.records.setdefault(server_round, RoundRecord(server_round))

    @property
    def history(self) -> list[RoundRecord]:
        """Every completed round of the run, oldest first (earlier processes' included)."""
        return self.earlier + [self.records[r] for r in self._closed]

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate; a resumed run starts from its checkpoint's weights, whatever ``inner``'s."""
        from flwr.common import ndarrays_to_parameters

        initial = self.inner.initialize_parameters(client_manager)
        if self.earlier and self._latest is not None:
            return ndarrays_to_parameters(self._latest)
        return initial

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate, and tell every site the round number.

        The run's first round (of this process) waits for every site: a day for a new
        run (Flower's wait), :data:`RESUMED_WAIT_SECONDS` for a resumed one; later
        rounds go on as soon as the quorum is available.
        """
        # num_available() also refreshes Flower's list of nodes; wait_for() does not.
        if server_round == self.first_round and client_manager.num_available() < self.config.sites:
            wait = _WAIT_ALL_SECONDS if self.first_round == 1 else RESUMED_WAIT_SECONDS
            client_manager.wait_for(self.config.sites, timeout=wait)
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config["round"] = server_round
        self._asked[("fit", server_round)] = {str(proxy.cid) for proxy, _ in instructions}
        return instructions

    def _lost(
        self,
        *,
        answered: dict[str, str],
        asked: set[str],
        failures: list[Any],
        expected: Iterable[str] = (),
    ) -> dict[str, str]:
        """Sites that did not answer (``answered``: name -> node id), each with its reason.

        A site's own refusal names it and says why (budget, error); an expected site, or
        a node asked whose site is known, that did not answer is a dropout; a node asked
        that no message names is named by its node id (or counted, when a named refusal
        may be it).
        """
        lost: dict[str, str] = {}
        unnamed_failures: set[str] = set()
        for failure in failures:
            match = _SITE_REASON.search(str(failure))
            if match is None:
                unnamed_failures.add(str(failure))
            elif match["site"] not in answered:
                lost[match["site"]] = match["reason"]
        for name in expected:
            if name not in answered:
                lost.setdefault(name, "dropout")
        unknown: list[str] = []
        for cid in sorted(asked - set(answered.values())):
            site = self._site_of_node.get(cid)
            if site is None:
                unknown.append(cid)
            elif site not in answered:
                lost.setdefault(site, "dropout")
        known = set(self._site_of_node.values())
        named_elsewhere = [s for s in lost if s not in known]
        if asked and not named_elsewhere:
            lost.update({_node(cid): "dropout" for cid in unknown})
            return lost
        count = len(unknown) if asked else len(unnamed_failures)
        for index in range(count - len(named_elsewhere)):
            lost[f"unnamed site {index + 1}"] = "dropout"
        return lost

    def fail_round(
        self,
        server_round: int,
        failures: list[Any],
        *,
        active: set[str] | None = None,
    ) -> None:
        """Stop the run: ``server_round`` aggregated fewer sites than required.

        ``active``: node ids SecAgg+ still counted when it halted the round (they
        answered, but too few to unmask). The message names each lost site, what to
        look at for its reason, and the checkpoint of the last good round, if any.
        """
        record = self._record(server_round)
        if active is not None:
            answered = {self._site_of_node.get(c, _node(c)): c for c in active}
            record.missing = self._lost(
                answered=answered,
                asked=self._asked.get(("fit", server_round), set()),
                failures=failures,
                expected=self._expected & set(self._site_of_node.values()),
            )
        elif not record.missing:
            record.missing = self._lost(
                answered={k: str(v) for k, v in record.participants.items()},
                asked=self._asked.get(("fit", server_round), set()),
                failures=failures,
                expected=self._expected,
            )
        record.failures = len(record.missing)
        raise RoundFailedError(
            self._failure_message(record, halted=active is not None),
            round_number=server_round,
            sites=record.missing,
        )

    def _failure_message(self, record: RoundRecord, *, halted: bool) -> str:
        what = ", ".join(f"{site} ({reason})" for site, reason in sorted(record.missing.items()))
        reasons = sorted(set(record.missing.values()) & set(_HINTS))
        hints = f" To check: {'; '.join(_HINTS[r] for r in reasons)}." if reasons else ""
        halt = " (SecAgg+ could not unmask it: too few sites answered a stage)" if halted else ""
        kept = ""
        if self.checkpointed is not None:
            done, path = self.checkpointed
            kept = (
                f"; the last good global model (round {done}) is kept as a checkpoint to "
                f"resume from: {path}"
            )
        return (
            f"round {record.round} of {self.config.rounds}: {record.sites_ok} site(s) "
            f"contributed, {self.required_sites} of {self.config.sites} required{halt}; "
            f"lost: {what or 'unknown'}.{hints} No model is the result of this run{kept}"
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the quorum, note who took part and what the strategy is handed, delegate."""
        record = self._record(server_round)
        record.sites_ok = len(results)
        for proxy, res in results:
            record.seen_by_strategy.append(
                weights_digest(parameters_to_ndarrays(res.parameters))[:16]
            )
            metrics = res.metrics or {}
            cid = str(proxy.cid)
            site = str(metrics["site"]) if "site" in metrics else _node(cid)
            record.participants[site] = int(cid)
            if "site" in metrics:
                self._site_of_node[cid] = site
                self._expected.add(site)
                record.epsilon_by_site[site] = float(metrics.get("epsilon_run", 0.0))
        record.missing = self._lost(
            answered={k: str(v) for k, v in record.participants.items()},
            asked=self._asked.get(("fit", server_round), set()),
            failures=list(failures),
            expected=self._expected,
        )
        record.failures = len(record.missing)
        if len(results) < self.required_sites:
            self.fail_round(server_round, list(failures))
        aggregated = self.inner.aggregate_fit(server_round, results, failures)
        record.aggregated = aggregated[0] is not None
        if aggregated[0] is not None:
            self._latest = parameters_to_ndarrays(aggregated[0])
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
        self._asked[("evaluate", server_round)] = {str(proxy.cid) for proxy, _ in instructions}
        if not instructions:
            self._close_round(self._record(server_round))
        return instructions

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Accuracy over the sites' (noisy, for private runs) counts; closes the round.

        A site lost in evaluation does not fail the round (the model is aggregated):
        the accuracy covers the sites that answered, and the record names the others.
        """
        record = self._record(server_round)
        correct = sum(float(res.metrics.get("correct", 0.0)) for _, res in results)
        count = sum(float(res.metrics.get("count", 0.0)) for _, res in results)
        record.sites_evaluated = len(results)
        answered = {
            self._site_of_node.get(str(p.cid), _node(str(p.cid))): str(p.cid) for p, _ in results
        }
        record.evaluation_missing = self._lost(
            answered=answered,
            asked=self._asked.get(("evaluate", server_round), set()),
            failures=list(failures),
        )
        if results and count > 0:
            record.accuracy = min(1.0, max(0.0, correct / count))
        record.evaluated = list(answered)
        record.groups = sum_groups(
            (self._site_of_node.get(str(p.cid), _node(str(p.cid))), res.metrics or {})
            for p, res in results
        )
        if self.config.privacy == "none" and results:
            loss, _ = self.inner.aggregate_evaluate(server_round, results, failures)
            record.loss = loss
        self._close_round(record)
        return record.loss, {}

    def _close_round(self, record: RoundRecord) -> None:
        """Record the round (``on_round``), then checkpoint it (``on_checkpoint``)."""
        self.on_round(record)
        self._closed.append(record.round)
        if self.checkpoint_dir is None or self._latest is None:
            return
        history = self.history
        epsilon: dict[str, float] = {}
        for done in history:
            for site, value in done.epsilon_by_site.items():
                epsilon[site] = max(epsilon.get(site, 0.0), value)
        checkpoint = Checkpoint(
            run_id=self.run_id,
            round=record.round,
            rounds_planned=self.config.rounds,
            weights=self._latest,
            config=self.config.to_json(),
            secure_aggregation=secagg_settings(self.config),
            epsilon_run_by_site=epsilon,
            history=[r.to_json() for r in history],
        )
        digest = checkpoint.write(self.checkpoint_dir)
        self.checkpointed = (record.round, self.checkpoint_dir / CHECKPOINT_NAME)
        if self.on_checkpoint is not None:
            self.on_checkpoint(checkpoint, digest)

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
    """Run rounds ``strategy.first_round`` to ``config.rounds`` on Flower's legacy workflow.

    The one server loop of simulation and deployment: with secure aggregation the fit
    stage is Flower's ``SecAggPlusWorkflow`` (:func:`secagg_settings`: every share with
    up to 10 sites, half beyond; 60% of the shares reconstruct a dropped site's mask;
    site weights of at most :data:`~insitu.federated._config.MAX_SITE_WEIGHT`). A
    resumed run starts at its first round to run, so Flower's round counter, the
    messages' group ids and every round number the sites and the ledger see are the
    run's own. Returns the final global weights.

    Raises:
        RoundFailedError: a round aggregated fewer sites than required (the run stops
            there; a round that SecAgg+ halted counts as such).

    """
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

    class RecordedSecAggPlus(SecAggPlusWorkflow):
        """SecAgg+ whose halts are failed rounds, with the failures sites sent back."""

        def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
            self.last_state = state
            return bool(super().setup_stage(grid, context, state))

        def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
            """Flower's stage, then only the sites that shared their keys can be 'dead'.

            Flower 1.41 keeps every site sampled at setup in ``sampled_node_ids``, and its
            unmask stage asks for shares of each one's keys: a site lost before it shared
            them (during setup or this stage) has none anywhere, so one lost site failed
            the round ("Not enough shares"). In the protocol (Bell et al. 2020) only the
            sites that shared their keys are unmasked or reconstructed; the others are in
            no one's masks (a site masks only with the sources it received shares from).
            """
            ok = bool(super().share_keys_stage(grid, context, state))
            state.sampled_node_ids = set(state.active_node_ids)
            return ok

        def __call__(self, grid: Any, context: Any) -> None:
            super().__call__(grid, context)
            current = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
            record = strategy.records.get(current)
            if record is None or not record.aggregated:
                state = self.last_state
                strategy.fail_round(
                    current,
                    list(state.failures),
                    active={str(n) for n in getattr(state, "active_node_ids", set())},
                )

    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy
    )
    settings = secagg_settings(config)
    fit_workflow = (
        RecordedSecAggPlus(
            num_shares=settings["num_shares"],
            reconstruction_threshold=settings["reconstruction_threshold"],
            clipping_range=settings["clipping_range"],
            max_weight=settings["max_weight"],
        )
        if config.secure_aggregation
        else None
    )
    _rounds_from(strategy.first_round, fit_workflow)(grid, legacy)
    arrays = legacy.state.array_records["parameters"]
    return [a.numpy() for a in arrays.values()]


def _rounds_from(first_round: int, fit_workflow: Any) -> Any:
    """Flower's ``DefaultWorkflow``, counting rounds from ``first_round`` instead of 1.

    The same steps as ``DefaultWorkflow.__call__`` in Flower 1.41 (register nodes,
    initial parameters, then per round: fit, central evaluation, site evaluation); only
    the first round differs, so a resumed run's rounds keep their numbers everywhere.
    """
    import timeit

    from flwr.app import ConfigRecord
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.workflow import DefaultWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
    from flwr.server.workflow.default_workflows import (
        default_centralized_evaluation_workflow,
        default_init_params_workflow,
    )

    class FromRound(DefaultWorkflow):
        def __call__(self, grid: Any, context: Any) -> None:
            thread, stop, registered = start_update_client_manager_thread(
                grid, context.client_manager
            )
            registered.wait()
            try:
                default_init_params_workflow(grid, context)
                config = ConfigRecord()
                config[Key.START_TIME] = timeit.default_timer()
                context.state.config_records[MAIN_CONFIGS_RECORD] = config
                for current_round in range(first_round, context.config.num_rounds + 1):
                    config[Key.CURRENT_ROUND] = current_round
                    self.fit_workflow(grid, context)
                    default_centralized_evaluation_workflow(grid, context)
                    self.evaluate_workflow(grid, context)
            finally:
                stop.set()
            thread.join()

    return FromRound(fit_workflow=fit_workflow)


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
    kept_round: int | None = None,
    kept_because: str = "",
) -> None:
    """Record ``federation.completed``: the model's digests, this run's privacy, its rounds.

    ``kept_round`` (with why) when the model is an earlier round's than the last.

    ``epsilon_run`` is the most any site spent on one record in *this* run (``None``
    without privacy): what a model card built from this run must state at least.
    ``round_entries`` links each round of the run once: the last ``federation.round``
    entry of each round number (a round trained again after a resume supersedes the
    entry its first attempt left), rounds before a resume included.
    """
    last: dict[int, int] = {}
    for entry in ledger.entries(event_type="federation.round"):
        if entry.payload.get("run") == run_id:
            last[int(entry.payload["round"])] = entry.seq
    events.FEDERATION_COMPLETED.record(
        ledger,
        run=run_id,
        rounds=rounds,
        central_accuracy=central_accuracy,
        model_sha256=weights_digest(weights),
        onnx_sha256=hashlib.sha256(onnx).hexdigest(),
        epsilon_run=epsilon_run,
        delta=delta,
        round_entries=[last[r] for r in sorted(last)],
        **(
            {"kept_round": kept_round, "kept_because": kept_because}
            if kept_round is not None and kept_round != rounds
            else {}
        ),
    )


def record_failed(
    ledger: Any, *, run_id: str, error: BaseException, checkpoint_round: int | None = None
) -> None:
    """Record ``federation.failed``: the run has no model; the round and sites, if known.

    ``checkpoint_round``: the last good round, kept as a checkpoint to resume from.
    """
    round_number = getattr(error, "round", None)
    extra = {} if checkpoint_round is None else {"checkpoint_round": checkpoint_round}
    events.FEDERATION_FAILED.record(
        ledger,
        run=run_id,
        round=round_number,
        sites=getattr(error, "sites", {}),
        reason=str(error)[:500],
        **extra,
    )


def record_round(ledger: Any, *, run_id: str, record: RoundRecord) -> None:
    """Record ``federation.round``: who took part and who was lost, what the figures cover."""
    events.FEDERATION_ROUND.record(ledger, run=run_id, **record.ledger_payload())


def record_checkpointed(ledger: Any, *, checkpoint: Checkpoint, sha256: str) -> None:
    """Record ``federation.checkpointed``: the round kept, its weights and file digests."""
    events.FEDERATION_CHECKPOINTED.record(
        ledger,
        run=checkpoint.run_id,
        round=checkpoint.round,
        model_sha256=checkpoint.model_sha256,
        checkpoint_sha256=sha256,
    )


def record_resumed(ledger: Any, *, checkpoint: Checkpoint, sha256: str) -> None:
    """Record ``federation.resumed``: the run goes on after round ``checkpoint.round``."""
    events.FEDERATION_RESUMED.record(
        ledger,
        run=checkpoint.run_id,
        from_round=checkpoint.round,
        model_sha256=checkpoint.model_sha256,
        checkpoint_sha256=sha256,
    )
