"""Performance per group of persons, measured where the data is (AI Act Annex IV 3, Art. 10).

The schema declares sensitive attributes (``[groups] sensitive``: categorical features
with declared categories, so the groups are public and the same at every site). At the
final evaluation each site counts, on its held-out records and per value of each
attribute, the final model's true and false positives and negatives (positive: label 1),
and releases the count vector:

* each subject counts once per attribute: a subject with ``r`` records adds ``1 / r`` to
  the cell of each record, so one subject moves each attribute's cells by at most 1 in
  total (L1, hence L2), and the whole vector by at most ``sqrt(A)`` in L2 for ``A``
  attributes. Values outside the declared categories count in one more group, ``OTHER``
  (the vector's shape never depends on the data);
* with ``record`` privacy the vector gets Gaussian noise of standard deviation
  ``sigma * sqrt(A)`` per cell (``sigma`` calibrated for ``--evaluation-epsilon`` and the
  run's delta, one Gaussian mechanism), drawn from :class:`~insitu.privacy.SecureRandom`,
  and the release is charged to the held-out subjects first (``privacy.spent``,
  mechanism ``evaluation-groups``). A site whose subjects have no budget left releases no
  group counts (the refusal is in its ledger) and still returns its evaluation; without
  privacy the counts are exact (nothing is claimed); under ``site`` privacy sites
  evaluate nothing, so nothing is measured per group.

The counts travel as Flower metrics named ``group:ATTRIBUTE=VALUE:CELL`` (numbers only:
the site's egress witness records each). The coordinator sums each cell over the sites
that released (:func:`sum_groups`) and records the sums in its ledger as
``evaluation.groups`` (:func:`record_groups`), with the noise per cell, the sites summed,
and the schema's minimum group size and gap threshold; the report turns them into
accuracy and error rates with intervals (``insitu.report``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from insitu.audit import events
from insitu.data import DataSchema, TrainingData
from insitu.errors import BudgetExceededError
from insitu.federated._config import FederationConfig
from insitu.privacy import PrivacyEvent, SecureRandom, SubjectBudget, calibrate_noise
from insitu.workspace import Workspace

__all__ = [
    "CELLS",
    "MECHANISM",
    "OTHER",
    "GroupSums",
    "group_counts",
    "group_keys",
    "group_noise_std",
    "record_groups",
    "release_groups",
    "sum_groups",
]

logger = logging.getLogger(__name__)

#: The cells of each group: true/false positives, true/false negatives (positive: label 1).
CELLS = ("tp", "fp", "tn", "fn")
#: The group of values outside an attribute's declared categories.
OTHER = "(other)"
#: The mechanism name of the release in ``privacy.spent``.
MECHANISM = "evaluation-groups"
_PREFIX = "group:"


def group_keys(schema: DataSchema) -> list[tuple[str, str, str, str]]:
    """``(metric key, attribute, value, cell)`` of every released cell, in vector order."""
    keys = []
    for attribute in schema.sensitive:
        for value in (*schema.categories[attribute], OTHER):
            for cell in CELLS:
                keys.append((f"{_PREFIX}{attribute}={value}:{cell}", attribute, value, cell))
    return keys


def _sigma(config: FederationConfig) -> float:
    """The Gaussian mechanism's noise multiplier for ``--evaluation-epsilon`` (one release)."""
    return calibrate_noise(
        target_epsilon=config.evaluation_epsilon, delta=config.delta, sample_rate=1.0, steps=1
    )


def group_noise_std(config: FederationConfig, schema: DataSchema) -> float:
    """Standard deviation of the noise on each cell a site releases (0 without privacy)."""
    if config.privacy != "record" or not schema.sensitive:
        return 0.0
    return _sigma(config) * math.sqrt(len(schema.sensitive))


def _value_index(data: TrainingData, attribute: str, values: tuple[str, ...]) -> np.ndarray:
    """Each row's value of ``attribute`` as an index into ``values`` (``len(values)``: other).

    Read from the one-hot columns ``attribute=value`` the encoder made (a sensitive
    attribute is a categorical feature with declared categories).
    """
    names = {name: i for i, name in enumerate(data.feature_names)}
    columns = [names[f"{attribute}={value}"] for value in values]
    onehot = data.features[:, columns] > 0.5
    return np.where(onehot.any(axis=1), onehot.argmax(axis=1), len(values))


def group_counts(schema: DataSchema, data: TrainingData, predicted: np.ndarray) -> np.ndarray:
    """The exact count vector (see the module docstring), in :func:`group_keys` order."""
    labels = np.asarray(data.labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    cell = np.where(labels, np.where(predicted, 0, 3), np.where(predicted, 1, 2))
    subject = data.groups
    weight = 1.0 / np.bincount(subject)[subject] if len(subject) else np.zeros(0)
    parts = []
    for attribute in schema.sensitive:
        values = schema.categories[attribute]
        index = _value_index(data, attribute, values) * len(CELLS) + cell
        parts.append(np.bincount(index, weights=weight, minlength=(len(values) + 1) * len(CELLS)))
    return np.concatenate(parts) if parts else np.zeros(0)


def _predict(model: torch.nn.Module, features: np.ndarray) -> np.ndarray | None:
    """The binary model's predictions (logit above 0); None for another kind of model."""
    with torch.no_grad():
        logits = model(torch.from_numpy(features))
    if logits.shape[-1] != 1:
        return None
    predicted: np.ndarray = (logits.squeeze(-1) > 0).numpy()
    return predicted


def release_groups(
    ws: Workspace,
    data: TrainingData,
    model: torch.nn.Module,
    schema: DataSchema,
    config: FederationConfig,
    *,
    run: str,
    round_number: int,
    dataset: str,
) -> dict[str, float]:
    """The site's group metrics for the coordinator; ``{}`` when nothing is released.

    With ``record`` privacy the release is charged first (``evaluation-groups``) to the
    subjects of ``data`` it still fits, and only their records are counted; a refusal
    (no subject has budget left) is recorded by the budget and releases nothing.
    """
    if not schema.sensitive or config.privacy == "site" or not len(data.labels):
        return {}
    std = group_noise_std(config, schema)
    if config.privacy == "record":
        try:
            with ws.ledger() as ledger:
                charge = SubjectBudget.for_workspace(ws, ledger).charge(
                    data.subject_keys,
                    PrivacyEvent(_sigma(config), 1.0, 1),
                    mechanism=MECHANISM,
                    run=run,
                    round=round_number,
                    dataset=dataset,
                )
        except BudgetExceededError:
            logger.warning("no group counts released: %s", MECHANISM)
            return {}
        data = data.admitted(charge.admission.admitted)
    predicted = _predict(model, data.features)
    if predicted is None:
        logger.warning("group counts need a binary model (one logit); none released")
        return {}
    counts = group_counts(schema, data, predicted)
    noisy = counts + SecureRandom().normal(counts.shape, std=std)
    return {key: float(v) for (key, *_), v in zip(group_keys(schema), noisy, strict=True)}


@dataclass
class GroupSums:
    """The coordinator's sums of the sites' group metrics (cell key -> sum)."""

    sums: dict[str, float] = field(default_factory=dict)
    #: Sites whose counts are summed.
    sites: list[str] = field(default_factory=list)


def sum_groups(named: Iterable[tuple[str, Mapping[str, Any]]]) -> GroupSums:
    """Sum the group metrics of ``(site, metrics)`` pairs; sites without any are left out."""
    result = GroupSums()
    for site, metrics in named:
        cells = {k: float(v) for k, v in metrics.items() if k.startswith(_PREFIX)}
        if not cells:
            continue
        result.sites.append(site)
        for key, value in cells.items():
            result.sums[key] = result.sums.get(key, 0.0) + value
    return result


def record_groups(
    ledger: Any,
    *,
    run_id: str,
    round_number: int,
    schema: DataSchema,
    config: FederationConfig,
    sums: GroupSums | None,
    sites_evaluated: Iterable[str] = (),
) -> None:
    """Record ``evaluation.groups``: the summed counts per attribute, value and cell.

    Nothing is recorded when the schema declares no sensitive attribute. Under ``site``
    privacy (no site evaluation) the entry says that nothing was measured.
    """
    if not schema.sensitive:
        return
    sums = sums or GroupSums()
    groups: dict[str, dict[str, dict[str, float]]] = {}
    if sums.sites:
        for key, attribute, value, cell in group_keys(schema):
            cells = groups.setdefault(attribute, {}).setdefault(value, {})
            cells[cell] = round(sums.sums.get(key, 0.0), 3)
    private = config.privacy == "record"
    events.EVALUATION_GROUPS.record(
        ledger,
        run=run_id,
        round=round_number,
        privacy=config.privacy,
        attributes=list(schema.sensitive),
        groups=groups,
        sites=sorted(sums.sites),
        sites_missing=sorted(set(sites_evaluated) - set(sums.sites)),
        noise_std=group_noise_std(config, schema),
        epsilon=config.evaluation_epsilon if private else None,
        delta=config.delta if private else None,
        min_size=schema.group_min_size,
        max_gap=schema.group_max_gap,
    )
