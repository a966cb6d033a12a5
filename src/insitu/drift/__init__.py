"""Drift monitoring with no input stored: DP reference profiles and a runtime monitor.

At training time each site releases noisy histograms of its data over bins fixed by the
data schema, paid from its own privacy budget (:func:`release_profile`); the
coordinator sums them (:func:`combine_releases`) into a :class:`ReferenceProfile` that
ships in the model card. At inference time the :class:`DriftMonitor` counts what the
model sees in the same bins and compares: population stability index and a chi-square
two-sample test per feature, thresholds in the workspace config, events in the ledger,
gauges for Prometheus. ``docs/operations.md`` has the threat model. An image or signal
model is watched on statistics of each record (mean, spread and saturation per channel,
quadrant means, gradient), binned over ranges its declared value range fixes
(``ProfileLayout.from_schema`` of an array schema; ``docs/arrays.md``).

Layer 8: imports ``insitu.bundle`` (the card's reference profile), ``insitu.data``,
``insitu.privacy`` and below.
"""

from __future__ import annotations

from insitu.drift._monitor import DriftMonitor, DriftThresholds, drift_status
from insitu.drift._profile import (
    OUTPUT,
    ProfileLayout,
    ReferenceProfile,
    bin_counts,
    combine_releases,
    noisy_release,
)
from insitu.drift._release import release_profile
from insitu.drift._stats import FeatureDrift, population_stability_index, two_sample_p_value

__all__ = [
    "OUTPUT",
    "DriftMonitor",
    "DriftThresholds",
    "FeatureDrift",
    "ProfileLayout",
    "ReferenceProfile",
    "bin_counts",
    "combine_releases",
    "drift_status",
    "noisy_release",
    "population_stability_index",
    "release_profile",
    "two_sample_p_value",
]
