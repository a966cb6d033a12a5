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
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from insitu.errors import UsageError

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
ModelFamily = Literal["logistic", "mlp"]
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
    batch_size: int = 256
    learning_rate: float = 2.0
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
        if self.model not in ("logistic", "mlp"):
            raise UsageError(f"--model {self.model!r}: use logistic or mlp")

    @property
    def required_sites(self) -> int:
        """Sites that must return an update for a round to count (the quorum)."""
        return self.min_sites or default_quorum(self.sites)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (recorded in the ledger with the run)."""
        return asdict(self)
