"""The settings of one federated run, validated before anything starts.

The *quorum* of a run (:attr:`FederationConfig.required_sites`) is the number of sites
whose update a round must aggregate to count. By default it is what SecAgg+ needs to
unmask a round, computed by Flower's own rule (``SecAggPlusWorkflow``: the shares of
each key, ``num_shares``, are every site up to 10 sites and about half beyond; the
reconstruction threshold is ``max(round(0.6 * num_shares), 2)``) applied to the whole
federation: ``max(round(0.6 * sites), 2)``, never more than the sites. Up to 10 sites
this *is* SecAgg+'s threshold; beyond, it is stricter than each neighbourhood's. The same
default holds without secure aggregation (a lost site costs nothing cryptographic there,
but a round averaged over fewer than 60% of the federation would speak for too few).
An explicit ``--min-sites`` below the threshold SecAgg+ can reconstruct with is refused
when secure aggregation is on: such a round could never be unmasked.

Defaults that need no tuning (docs/federated.md, "Defaults that need no tuning"): the
local batch size is chosen from each site's number of records when not given
(:meth:`FederationConfig.batch_for`: about a quarter of the site's records, a power of
two from 8 to 256), the local learning rate from the server optimizer
(:meth:`FederationConfig.local_learning_rate`), the inputs are centred on the middle of
their declared ranges while training (:attr:`FederationConfig.center_inputs`), and the
server applies Adam to the aggregated update (``server_optimizer``; post-processing of
what the sites released: no privacy cost).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from insitu.errors import UsageError
from insitu.training import DEFAULT_BATCH_RULE, default_batch, default_learning_rate

__all__ = [
    "MAX_SITE_WEIGHT",
    "SECAGG_RECONSTRUCTION",
    "FederationConfig",
    "default_quorum",
    "secagg_num_shares",
    "secagg_share_fraction",
    "secagg_threshold",
]

#: Sites weigh 1 to this many in the weighted mean (weights fixed before a run).
MAX_SITE_WEIGHT = 1000
#: The share of a key's shares that reconstructs it (SecAgg+'s reconstruction threshold).
SECAGG_RECONSTRUCTION = 0.6
#: Up to this many sites, every site holds a share of every key; beyond, about half.
SECAGG_ALL_SHARES_UP_TO = 10


def secagg_share_fraction(sites: int) -> float:
    """``num_shares`` as the run passes it to ``SecAggPlusWorkflow`` (a fraction)."""
    return 1.0 if sites <= SECAGG_ALL_SHARES_UP_TO else 0.5


def secagg_num_shares(sites: int) -> int:
    """The shares of each key SecAgg+ makes for ``sites`` sites (Flower's rule)."""
    shares = round(secagg_share_fraction(sites) * sites)
    if shares < sites and shares % 2 == 0:
        shares += 1
    return sites if shares <= 2 else shares


def secagg_threshold(sites: int) -> int:
    """Shares that reconstruct a key: the fewest live neighbours SecAgg+ can unmask with.

    Flower's rule for a fractional threshold: ``max(round(0.6 * num_shares), 2)``.
    """
    return max(round(SECAGG_RECONSTRUCTION * secagg_num_shares(sites)), 2)


def default_quorum(sites: int) -> int:
    """The default quorum: SecAgg+'s rule applied to the whole federation (see above)."""
    return min(sites, max(round(SECAGG_RECONSTRUCTION * sites), 2))


Privacy = Literal["record", "site", "none"]
Robust = Literal["none", "trimmed-mean", "median"]
Accountant = Literal["pld", "rdp"]
ServerOptimizer = Literal["fedavg", "fedadam", "fedyogi", "auto"]

ModelFamily = Literal["logistic", "mlp", "cnn"]
_PARTITION = re.compile(r"^(iid|by:[A-Za-z0-9_.\-]+|dirichlet:\d+(\.\d+)?)$")


@dataclass(frozen=True)
class FederationConfig:
    """One run's settings.

    ``epsilon`` and ``delta`` are the target of *this run* for each record at each site;
    each site also enforces its own budget per data subject across every use
    (``insitu.privacy.SubjectBudget``). ``evaluation_epsilon`` is what the final
    evaluation costs each held-out record (record-level privacy: sites release noisy
    counts of correct predictions). ``inference_epsilon`` is what inferring a schema from
    the data costs each record (``simulate --label``: vocabularies and ranges released
    under DP, ``insitu.data.infer_schema``). ``seed`` fixes the initial model and non-private
    batch order only: DP noise and sampling are secret and never reproducible.
    """

    sites: int = 5
    rounds: int = 5
    partition: str = "iid"
    privacy: Privacy = "record"
    epsilon: float = 3.0
    delta: float = 1e-5
    secure_aggregation: bool = True
    robust: Robust = "none"
    model: ModelFamily = "logistic"
    hidden: int = 32
    local_epochs: int = 1
    #: Expected local batch; 0: chosen from each site's size (:meth:`batch_for`).
    batch_size: int = 0
    #: Local SGD learning rate; 0: by the server optimizer (:meth:`local_learning_rate`).
    learning_rate: float = 0.0
    #: What the server does with the aggregated update: ``fedavg`` (take it), ``fedadam``
    #: or ``fedyogi`` (Reddi et al. 2021: an adaptive step, computed from the released
    #: aggregate only, so post-processing at no privacy cost).
    #: ``auto``: FedAdam, except FedAvg for the CNN (on digits FedAdam at eta 1.0 diverged:
    #: 0.14 held-out accuracy, against 0.96 with FedAvg).
    server_optimizer: ServerOptimizer = "auto"
    #: The server optimizer's step size (eta) and its adaptivity (tau).
    server_learning_rate: float = 1.0
    server_tau: float = 0.1
    #: Train on inputs centred on the middle of their declared ranges ([-1, 1] instead of
    #: [0, 1]); the saved model is folded back to take the schema's encoding as it is.
    center_inputs: bool = True
    max_grad_norm: float = 1.0
    site_clip_norm: float = 1.0
    #: The quorum: sites whose update a round must aggregate. 0: :func:`default_quorum`.
    min_sites: int = 0
    test_fraction: float = 0.2
    seed: int = 0
    secagg_clipping_range: float = 64.0
    evaluation_epsilon: float = 0.5
    inference_epsilon: float = 0.5
    #: How sites calibrate their noise for the run's epsilon: ``pld`` (privacy loss
    #: distributions, the tighter) or ``rdp`` (the Rényi bound insitu used before: more
    #: noise for the same epsilon; kept to compare). Budgets always admit a use when
    #: either bound keeps it within budget.
    accountant: Accountant = "pld"

    def __post_init__(self) -> None:  # noqa: PLR0912 -- one check per setting
        if self.server_optimizer == "auto":
            chosen = "fedavg" if self.model == "cnn" else "fedadam"
            object.__setattr__(self, "server_optimizer", chosen)
        if not 1 <= self.sites <= 1000:
            raise UsageError(f"--sites {self.sites}: use 1 to 1000 sites")
        if not 1 <= self.rounds <= 10_000:
            raise UsageError(f"--rounds {self.rounds}: use 1 to 10000 rounds")
        if not _PARTITION.match(self.partition):
            raise UsageError(
                f"--partition {self.partition!r}: use iid, by:COLUMN or dirichlet:ALPHA"
            )
        if self.privacy not in ("record", "site", "none"):
            raise UsageError(f"--privacy {self.privacy!r}: use record, site or none")
        if self.privacy != "none":
            if not 0.01 <= self.epsilon <= 100 or not math.isfinite(self.epsilon):
                raise UsageError(f"--epsilon {self.epsilon}: use a value from 0.01 to 100")
            if not 0 < self.delta < 0.01:
                raise UsageError(
                    f"--delta {self.delta}: use a value above 0 and well below 1/records "
                    "(e.g. 1e-5)"
                )
        if self.robust not in ("none", "trimmed-mean", "median"):
            raise UsageError(f"--robust {self.robust!r}: use none, trimmed-mean or median")
        if self.robust != "none" and self.secure_aggregation:
            raise UsageError(
                "robust aggregation needs the individual updates, which secure aggregation "
                "hides: pass --no-secure-aggregation with --robust"
            )
        if self.privacy == "site" and self.sites < 2:
            raise UsageError("site-level privacy needs at least 2 sites")
        if self.secure_aggregation and self.sites < 3:
            raise UsageError(
                "secure aggregation needs at least 3 sites (or --no-secure-aggregation)"
            )
        if self.privacy == "record" and not 0.01 <= self.evaluation_epsilon <= 10:
            raise UsageError(
                f"--evaluation-epsilon {self.evaluation_epsilon}: use a value from 0.01 to 10"
            )
        if not 0.01 <= self.inference_epsilon <= 10:
            raise UsageError(
                f"--inference-epsilon {self.inference_epsilon}: use a value from 0.01 to 10"
            )
        if self.accountant not in ("pld", "rdp"):
            raise UsageError(f"--accountant {self.accountant!r}: use pld or rdp")
        if not 0 <= self.min_sites <= self.sites:
            raise UsageError(f"--min-sites {self.min_sites} must be between 0 and --sites")
        if self.secure_aggregation and 0 < self.min_sites < secagg_threshold(self.sites):
            floor = secagg_threshold(self.sites)
            raise UsageError(
                f"--min-sites {self.min_sites}: SecAgg+ cannot unmask a round of "
                f"{self.sites} sites with fewer than {floor} (its reconstruction threshold); "
                f"use --min-sites {floor} or more, or --no-secure-aggregation"
            )
        if not 0 < self.test_fraction < 0.9:
            raise UsageError("test fraction must be between 0 and 0.9")
        if self.server_optimizer not in ("fedavg", "fedadam", "fedyogi"):
            raise UsageError(
                f"--server-optimizer {self.server_optimizer!r}: use auto, fedavg, fedadam or "
                "fedyogi"
            )
        if self.batch_size < 0 or self.learning_rate < 0 or not self.server_learning_rate > 0:
            raise UsageError(
                "--batch-size and --learning-rate must be positive (0: chosen by insitu), "
                "--server-learning-rate above 0"
            )
        if self.model not in ("logistic", "mlp", "cnn"):
            raise UsageError(f"--model {self.model!r}: use logistic, mlp or cnn (array data)")

    def batch_for(self, rows: int) -> int:
        """The expected local batch at a site of ``rows`` records.

        ``batch_size`` when given; else about a quarter of the records, rounded to a power
        of two, from 8 to 256 (120 records: 32; 10,000: 256). A site's size is already
        part of its privacy event (the sample rate is the batch over the records, fixed
        on the run's first round); the batch adds no other use of the data.
        """
        return self.batch_size or default_batch(rows)

    def local_learning_rate(self) -> float:
        """``learning_rate`` when given, else the rate of the run's server optimizer."""
        return self.learning_rate or default_learning_rate(self.server_optimizer)

    def rules(self) -> str:
        """The rules the run's defaults follow, in one line (``federation.started``)."""
        batch = f"batch {self.batch_size}" if self.batch_size else f"batch: {DEFAULT_BATCH_RULE}"
        server = (
            "server: FedAvg"
            if self.server_optimizer == "fedavg"
            else f"server: {self.server_optimizer} (eta {self.server_learning_rate:g}, "
            f"tau {self.server_tau:g}; post-processing, no privacy cost)"
        )
        centred = "inputs centred on their declared ranges" if self.center_inputs else ""
        return "; ".join(
            p for p in (batch, f"local lr {self.local_learning_rate():g}", server, centred) if p
        )

    @property
    def required_sites(self) -> int:
        """Sites that must return an update for a round to count (the quorum)."""
        return self.min_sites or default_quorum(self.sites)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (recorded in the ledger with the run)."""
        return asdict(self)
