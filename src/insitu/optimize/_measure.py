"""Measuring a candidate on this machine: size, latency, throughput, accuracy, parity.

Latency is the wall time of one ``session.run`` on one record (batch 1), after warm-up
runs, reported as the 50th and 99th percentiles; throughput is records per second at
batch 64. Both are taken in one thread (the sessions' ``intra_op_num_threads``): the
choice is made for the device, where the model shares a small CPU. Quick mode takes
fewer repetitions: noisier percentiles, the same procedure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.optimize._onnx import run, session_for
from insitu.optimize._source import scores_and_labels

__all__ = ["Timing", "measure_outputs", "time_session", "timing_plan"]


@dataclass(frozen=True)
class Timing:
    """How many runs each figure is taken over."""

    warmup: int
    latency_runs: int
    throughput_runs: int


def timing_plan(*, quick: bool) -> Timing:
    """Repetitions of the full and the quick measurement."""
    return Timing(20, 200, 10) if quick else Timing(100, 2000, 100)


def time_session(session: Any, x: np.ndarray, timing: Timing) -> dict[str, float]:
    """p50/p99 latency (ms) at batch 1 and throughput (records/s) at batch 64."""
    name = session.get_inputs()[0].name
    one = {name: np.ascontiguousarray(x[:1])}
    rows = np.resize(x, (64, *x.shape[1:])) if len(x) < 64 else x[:64]
    many = {name: np.ascontiguousarray(rows)}
    for _ in range(timing.warmup):
        session.run(None, one)
    samples = np.empty(timing.latency_runs)
    for i in range(timing.latency_runs):
        started = time.perf_counter_ns()
        session.run(None, one)
        samples[i] = time.perf_counter_ns() - started
    for _ in range(max(1, timing.warmup // 10)):
        session.run(None, many)
    started = time.perf_counter_ns()
    for _ in range(timing.throughput_runs):
        session.run(None, many)
    elapsed = (time.perf_counter_ns() - started) / 1e9
    return {
        "latency_p50_ms": float(np.percentile(samples, 50)) / 1e6,
        "latency_p99_ms": float(np.percentile(samples, 99)) / 1e6,
        "throughput_per_s": 64 * timing.throughput_runs / elapsed,
    }


def measure_outputs(
    model: bytes,
    x: np.ndarray,
    y: np.ndarray | None,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    *,
    name: str,
) -> tuple[Any, dict[str, float | None]]:
    """(session, accuracy and parity against the source's scores and labels on ``x``)."""
    session = session_for(model, name=name)
    scores, labels = scores_and_labels(run(session, x))
    diff = None
    if scores.shape == reference.shape:
        diff = float(np.max(np.abs(scores - reference)))
    return session, {
        "accuracy": None if y is None else float(np.mean(labels == y)),
        "max_abs_diff": diff,
        "label_agreement": float(np.mean(labels == reference_labels)),
    }
