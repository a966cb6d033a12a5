"""Explanations of image and signal predictions by occlusion: which region mattered.

For a record of shape (C, H, W) or (C, L), :func:`occlusion_map` hides one patch at a
time (every channel of it), replacing its values by a baseline (by default the low end
of the declared value range: black for an image, silence for a signal), and records how
much the model's score of the explained class falls. The result is a heat map of the
record's spatial shape (H, W) or (L,): large where hiding the region costs the class the
most. Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (2014).

Model-agnostic (any callable from a batch of records to scores, e.g. an ONNX session's
``run``) and exact for what it measures; one batch of ``patches + 1`` records per
explained record, so it costs no more than a prediction of that batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from insitu.errors import InvalidInputError

__all__ = ["occlusion_map"]


def occlusion_map(
    predict: Callable[[np.ndarray], np.ndarray],
    record: np.ndarray,
    *,
    patch: int = 2,
    baseline: float = 0.0,
    target: int | None = None,
) -> tuple[np.ndarray, int]:
    """The heat map of ``record`` for class ``target`` (default: the predicted class).

    ``predict`` maps a float32 batch (N, *record.shape) to scores (N, K), or (N, 1) for
    a binary logit (the explained score is then the logit itself). Returns the map and
    the class explained.

    Raises:
        InvalidInputError: a record that is not (C, H, W) or (C, L), or a patch of 0.

    """
    record = np.asarray(record, dtype=np.float32)
    if record.ndim not in (2, 3) or patch < 1:
        raise InvalidInputError(
            f"occlusion explains one record of shape (C, H, W) or (C, L) with a patch of at "
            f"least 1, not shape {record.shape} and patch {patch}"
        )
    spatial = record.shape[1:]
    corners = list(itertools.product(*(range(0, n, patch) for n in spatial)))
    batch = np.repeat(record[None], len(corners) + 1, axis=0)
    for index, corner in enumerate(corners, start=1):
        window = tuple(slice(c, c + patch) for c in corner)
        batch[index][(slice(None), *window)] = baseline
    scores = np.asarray(predict(batch), dtype=np.float64).reshape(len(batch), -1)
    if target is None:
        target = int(scores[0] > 0) if scores.shape[1] == 1 else int(scores[0].argmax())
    column = 0 if scores.shape[1] == 1 else target
    sign = -1.0 if scores.shape[1] == 1 and target == 0 else 1.0
    drops = sign * (scores[0, column] - scores[1:, column])
    heat = np.zeros(spatial, dtype=np.float64)
    for drop, corner in zip(drops, corners, strict=True):
        heat[tuple(slice(c, c + patch) for c in corner)] = drop
    return heat, target
