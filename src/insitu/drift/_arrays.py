"""Drift on images and signals: a few statistics per record, binned over the declared range.

A table's drift sketch bins each feature. An image's values one by one say little (a
pixel's histogram moves when the subject moves in the frame), and a 224 x 224 x 3 image
would need 150,528 histograms. Instead each record is summarized by statistics whose
range follows from the schema's declared value range ``[lo, hi]`` alone, never from data:

=====================================  ====================  ===========================
statistic (per channel ``k``)           declared range        what it is
=====================================  ====================  ===========================
``c{k}_mean``                           [lo, hi]              mean intensity
``c{k}_std``                            [0, (hi - lo) / 2]    standard deviation (the
                                                              largest values in [lo, hi]
                                                              can have)
``c{k}_at_min``, ``c{k}_at_max``        [0, 1]                fraction of values at the
                                                              declared minimum / maximum
                                                              (saturated; clipped values
                                                              included)
``top_left_mean`` ... ``bottom_right``  [lo, hi]              images: mean of each
                                                              quadrant over the channels
``gradient``                            [0, hi - lo]          mean absolute difference of
                                                              neighbouring values (rows and
                                                              columns; along a signal)
=====================================  ====================  ===========================

Each statistic is one numeric feature of a :class:`~insitu.drift.ProfileLayout` whose
``records`` say how to compute them, so everything after is the table's machinery
unchanged: ``bins`` equal bins of the declared range (ADR 0601), PSI and the chi-square
test (ADR 0602), and the DP release at the sites. A record adds one to one bin of each
of the ``m`` histograms, exactly as a table row does, so the release's sensitivity is
still ``sqrt(m)`` and its privacy event the same.

Records are counted in either of the two forms insitu holds them in: as the model takes
them, ``(N, *shape)`` in the declared range (the served model's input, which the runtime
hands to the monitor), or as the table rows underneath, ``(N, prod(shape))`` already
encoded to [0, 1] (a site's :class:`~insitu.data.TrainingData`). Values outside the
declared range are clipped to it first, as the model clips them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from insitu.errors import SchemaError

__all__ = ["QUADRANTS", "record_statistics", "statistic_ranges"]

#: The image quadrants, in the order of their statistics.
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")

#: A value this close to 0 or 1 (on the [0, 1] scale) is at the declared minimum / maximum.
_SATURATED = 1e-6


def statistic_ranges(records: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Each statistic's name and declared range, in the order of :func:`record_statistics`.

    ``records`` is a layout's description of its records: ``kind`` ("images" or
    "signals"), ``shape`` (C, H, W) or (C, L) and ``value_range`` [lo, hi].
    """
    shape = [int(v) for v in records["shape"]]
    low, high = (float(v) for v in records["value_range"])
    width = high - low
    out: list[tuple[str, float, float]] = []
    for k in range(shape[0]):
        out += [
            (f"c{k}_mean", low, high),
            (f"c{k}_std", 0.0, width / 2),
            (f"c{k}_at_min", 0.0, 1.0),
            (f"c{k}_at_max", 0.0, 1.0),
        ]
    if _has_quadrants(records["kind"], shape):
        out += [(f"{q}_mean", low, high) for q in QUADRANTS]
    if _has_neighbours(shape):
        out.append(("gradient", 0.0, width))
    return out


def _has_quadrants(kind: str, shape: list[int]) -> bool:
    return kind == "images" and shape[1] >= 2 and shape[2] >= 2


def _has_neighbours(shape: list[int]) -> bool:
    return any(n >= 2 for n in shape[1:])


def record_statistics(records: dict[str, Any], inputs: np.ndarray) -> np.ndarray:
    """The statistics of each record, each scaled to [0, 1] over its declared range.

    Returns an (N, m) array, one column per statistic of :func:`statistic_ranges`; the
    records are not kept.

    Raises:
        SchemaError: ``inputs`` are neither records of the declared shape nor rows of
            their encoded values.

    """
    shape = tuple(int(v) for v in records["shape"])
    low, high = (float(v) for v in records["value_range"])
    x = np.asarray(inputs)
    if x.dtype.kind not in "fiub":
        raise SchemaError(f"records of type {x.dtype} are not numbers")
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    scaled: np.ndarray
    if x.ndim == 2 and x.shape[1] == math.prod(shape):  # the encoded rows of a table
        scaled = x.reshape(len(x), *shape).astype(dtype, copy=False)
    elif x.ndim == len(shape) + 1 and tuple(x.shape[1:]) == shape:  # the model's input
        values = x.astype(dtype, copy=False)
        scaled = (values - np.asarray(low, dtype)) / np.asarray(high - low, dtype)
    else:
        raise SchemaError(
            f"records of shape {tuple(x.shape[1:])} do not match the drift profile's "
            f"{shape} (or {math.prod(shape)} encoded values a row); send records of the "
            "shape the model was trained on"
        )
    scaled = np.clip(scaled, 0.0, 1.0)  # NaN stays NaN: the counter refuses it
    rows = len(scaled)
    channels = scaled.reshape(rows, shape[0], -1)
    columns = np.stack(
        [
            channels.mean(axis=2),
            channels.std(axis=2) * 2.0,  # at most 1/2 on [0, 1]
            (channels <= _SATURATED).mean(axis=2),
            (channels >= 1.0 - _SATURATED).mean(axis=2),
        ],
        axis=2,
    ).reshape(rows, -1)  # c0_mean, c0_std, c0_at_min, c0_at_max, c1_mean, ...
    parts = [columns.astype(np.float64)]
    if _has_quadrants(str(records["kind"]), list(shape)):
        h, w = shape[1] // 2, shape[2] // 2
        top, bottom, left, right = slice(0, h), slice(h, None), slice(0, w), slice(w, None)
        quadrants = [(top, left), (top, right), (bottom, left), (bottom, right)]
        parts.append(
            np.stack([scaled[:, :, r, c].mean(axis=(1, 2, 3)) for r, c in quadrants], axis=1)
        )
    if _has_neighbours(list(shape)):
        parts.append(_gradient(scaled)[:, None])
    result: np.ndarray = np.clip(np.concatenate(parts, axis=1, dtype=np.float64), 0.0, 1.0)
    return result


def _gradient(scaled: np.ndarray) -> np.ndarray:
    """Mean absolute difference of neighbouring values along every spatial axis."""
    total = np.zeros(len(scaled), dtype=np.float64)
    pairs = 0
    for axis in range(2, scaled.ndim):
        if scaled.shape[axis] < 2:
            continue
        diff = np.abs(np.diff(scaled, axis=axis))
        total += diff.reshape(len(scaled), -1).sum(axis=1, dtype=np.float64)
        pairs += diff[0].size
    return total / pairs
