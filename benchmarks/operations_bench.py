"""Operations: what drift monitoring adds to inference, and how much a fine-tuning costs.

On ../shared/data/adult.csv (encoded with the carried Adult schema), on this machine:

* ``monitor``: the runtime's inference of a batch (ONNX Runtime as the runtime runs it:
  all cores but one, idle threads asleep; the 120-input logistic model and an mlp with
  32 hidden units) alone (the anchor) and followed by ``DriftMonitor.on_batch``
  (insitu), for batches of 1, 32 and 1024 rows; the ratio is the monitoring overhead.
  Checks (every 1000 rows) are included, as in the runtime. ``drift_bench.py`` has the
  side-by-side figures and where the monitor's time goes.
* ``status``: time of one comparison of all 14 histograms with the reference (PSI and
  chi-square), i.e. one ``check()``.
* ``finetune``: wall time of ``insitu.finetune.finetune`` on 4,000 local records (rebuild,
  budget charge, 3 epochs of DP-SGD on the last layer, export, evaluation, install).

    .venv/bin/python benchmarks/operations_bench.py

Writes benchmarks/results/operations.json with ``os.getloadavg()`` before and after (the
machine is shared: figures vary with its load).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.datasets import builtin_schema
from insitu.drift import DriftMonitor, ProfileLayout, combine_releases, noisy_release
from insitu.runtime import create_session
from insitu.training import build_model, export_onnx

ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult.csv"
OUT = Path(__file__).parent / "results" / "operations.json"


def _timed(fn, repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def _infer(session: object, rows: np.ndarray, monitor: DriftMonitor | None) -> None:
    outputs = session.run(None, {"features": rows})[0]  # type: ignore[attr-defined]
    if monitor is not None:
        monitor.on_batch("adult", "1.0.0", rows, outputs)


def monitor_part(inputs: np.ndarray, layout: ProfileLayout) -> dict:
    release, _ = noisy_release(layout, inputs[:16000], None, epsilon=1.0, delta=1e-5)
    profile = combine_releases(layout, [release])
    out: dict = {}
    for family in ("logistic", "mlp"):
        model = export_onnx(build_model(family, layout.n_inputs), layout.n_inputs)
        session = create_session(
            model, intra_op_threads=max(1, (os.cpu_count() or 1) - 1), spinning=False
        )
        for batch in (1, 32, 1024):
            rows = np.ascontiguousarray(inputs[16000 : 16000 + batch], dtype=np.float32)
            monitor = DriftMonitor()  # in memory: the ledger only sees transitions
            monitor.register("adult", "1.0.0", profile)
            repeat = max(20, 20000 // batch)

            a = _timed(functools.partial(_infer, session, rows, None), repeat)
            m = _timed(functools.partial(_infer, session, rows, monitor), repeat)
            out[f"{family}_batch_{batch}"] = {
                "anchor_inference_us": round(a * 1e6, 1),
                "insitu_inference_plus_monitor_us": round(m * 1e6, 1),
                "ratio": round(m / a, 2),
                "monitor_us_per_row": round((m - a) * 1e6 / batch, 2),
            }
    monitor = DriftMonitor()
    monitor.register("adult", "1.0.0", profile)
    monitor.on_batch("adult", "1.0.0", inputs[16000:20000], None)  # type: ignore[arg-type]
    out["check_ms"] = round(_timed(monitor.check, 50) * 1e3, 2)
    return out


def finetune_part() -> dict:
    from tests.finetune._device import build_device

    from insitu.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        device = build_device(Path(tmp))
        started = time.perf_counter()
        result = finetune(device.workspace(), "adult-income", device.data, epsilon=1.0)
        seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "rows": result.rows_train + result.rows_holdout,
        "installed": result.installed,
        "accuracy_installed": round(result.accuracy_installed, 4),
        "accuracy_finetuned": round(result.accuracy_finetuned, 4),
        "epsilon": result.epsilon,
    }


def main() -> None:
    load_before = os.getloadavg()
    schema = DataSchema.load(builtin_schema("adult"))
    frame = read_table(ADULT).sample(frac=1.0, random_state=0)
    inputs = FeatureEncoder.for_schema(schema).encode(frame)
    layout = ProfileLayout.from_schema(schema)
    results = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before},
        "monitor": monitor_part(inputs, layout),
        "finetune": finetune_part(),
    }
    results["machine"]["loadavg_after"] = os.getloadavg()
    results["machine"]["note"] = "shared machine: other sessions were running"
    OUT.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
