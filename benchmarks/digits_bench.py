"""Images end to end: scikit-learn's digits across 3 sites, a small CNN, DP-SGD, int8.

Issue 18: insitu's pipeline took tables only. This benchmark writes scikit-learn's 1,797
real 8x8 digits as ``digits.npz`` with their array schema
(:func:`insitu.datasets.write_digits`), trains the CNN of ``--model cnn`` across 3
simulated sites with ``insitu.federated.simulate`` (non-private, and DP-SGD at epsilon
1, 3 and 8, delta 1e-5). (int8: ``insitu optimize MODEL_DIR --target int8-static
--public-calibration --calibration cal.npz --eval eval.npz``, see docs/arrays.md.)

Settings: plain FedAvg (``--server-optimizer fedavg``: FedAdam at eta 0.3, the tabular
default, diverges on the CNN); non-private: batch 32, learning rate 0.5, 2 local epochs,
10 rounds; private: batch 256 (128 at epsilon 1), learning rate 2, 20 rounds (10 at
epsilon 1: about 374 training records a site cannot pay for more at epsilon 1).
For scale, published DP-SGD on all of MNIST (60,000 images): 95.0 / 96.6 / 97.3% at
epsilon 1.2 / 2.9 / 9.7 (TF Privacy tutorial); here each site holds about 470 images.

    .venv/bin/python benchmarks/digits_bench.py

Writes benchmarks/results/digits.json. About 3 minutes on 2 CPUs.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import insitu
from insitu.datasets import write_digits
from insitu.federated import FederationConfig, simulate
from insitu.workspace import Workspace

OUT = Path(__file__).parent / "results" / "digits.json"

RUNS: dict[str, dict[str, Any]] = {
    "non_private": {
        "privacy": "none", "rounds": 10, "batch_size": 32, "learning_rate": 0.5,
        "local_epochs": 2,
    },
    "epsilon_1": {"epsilon": 1.0, "rounds": 10, "batch_size": 128, "learning_rate": 2.0},
    "epsilon_3": {"epsilon": 3.0, "rounds": 20, "batch_size": 256, "learning_rate": 2.0},
    "epsilon_8": {"epsilon": 8.0, "rounds": 20, "batch_size": 256, "learning_rate": 2.0},
}  # fmt: skip


def federated(root: Path, data: Path, schema: Path) -> dict[str, Any]:
    """Each run's held-out accuracy and epsilon."""
    results: dict[str, Any] = {}
    for name, settings in RUNS.items():
        ws, _ = Workspace.init(root / name, name=name)
        config = FederationConfig(sites=3, model="cnn", server_optimizer="fedavg", **settings)
        started = time.perf_counter()
        result = simulate(ws, data, config, schema=schema)
        results[name] = {
            "settings": settings,
            "central_accuracy": round(float(result.central_accuracy or 0.0), 4),
            "epsilon_run": round(result.epsilon_run, 3),
            "seconds": round(time.perf_counter() - started, 1),
            "model_dir": str(result.model_dir),
        }
        print(name, results[name], flush=True)
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, schema = write_digits(root / "data")
        runs = federated(root, data, schema)
    doc = {
        "insitu": insitu.__version__,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "data": "scikit-learn digits: 1,797 real 8x8 images, 10 classes; 3 sites, IID",
        "model": "insitu --model cnn (two conv/GroupNorm/ReLU/max-pool blocks, 1,946 weights)",
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "model_dir"} for k, v in runs.items()},
        "reference": "DP-SGD on all of MNIST: 95.0/96.6/97.3% at epsilon 1.2/2.9/9.7",
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
