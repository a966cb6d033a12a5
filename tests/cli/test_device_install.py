"""A device runs insitu without the training stack: a light install that starts at once.

``test_device_life_without_the_training_stack`` runs every device verb in this venv's
Python with PyTorch, Flower, pandas, SHAP and scikit-learn made unimportable;
``test_device_venv`` builds a real venv from ``insitu[device]`` and runs the same life
there (and checks that ``import torch`` fails in it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cli._device import blocked_python, check_device_life, device_life, device_venv

ROOT = Path(__file__).resolve().parents[2]


def test_device_life_without_the_training_stack(tmp_path: Path) -> None:
    shown = device_life(tmp_path, blocked_python(tmp_path, sys.executable))
    check_device_life(shown)


def test_device_venv(tmp_path: Path) -> None:
    venv = device_venv(tmp_path, ROOT)
    python = str(venv / "bin" / "python")
    for package in ("torch", "flwr", "pandas", "shap", "sklearn"):
        proc = subprocess.run(
            [python, "-c", f"import {package}"], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 1, package
        assert "ModuleNotFoundError" in proc.stderr
    shown = device_life(tmp_path, [str(venv / "bin" / "insitu")])
    check_device_life(shown)
