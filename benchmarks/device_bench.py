"""The device install: its size, and the CPU time of a command, each beside its anchor.

1. Installed size: a venv holding only ``insitu[device]`` (made without pip, as a device
   image would be) against this project's full venv (training, audit, optimization,
   report); the largest packages of the device venv are listed.
2. CPU time (user + system, of the child process, median of ``--repeats`` runs) of
   ``insitu --version`` and ``insitu update --check`` (an enrolled device, against a
   TUF repository served on loopback), in the device venv and in the full venv, beside
   two anchors run alternately in the same loop: a bare Typer application printing its
   version (the floor of any Typer + Rich command line) and the CLI as it was before
   verbs loaded lazily (every verb module imported, then ``--version``).

    .venv/bin/python benchmarks/device_bench.py [--repeats 10]

Writes benchmarks/results/device.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cli._device import device_runner, device_venv, publisher
from tests.update._http import serving

ROOT = Path(__file__).resolve().parent.parent

BARE_TYPER = """
import typer
app = typer.Typer(add_completion=False)
@app.callback(invoke_without_command=True)
def main(version: bool = typer.Option(False, "--version")) -> None:
    if version:
        print("bare 0.0")
app()
"""

EAGER = """
import importlib, sys
from insitu.cli._lazy import VERBS
for module in {v.module for v in VERBS.values()}:
    importlib.import_module(f"insitu.cli.{module}")
from insitu.cli import run
sys.exit(run(["--version"]))
"""


def size_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            file = Path(dirpath) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return round(total / 1e6, 1)


def cpu_seconds(command: Sequence[str], env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed(commands: dict[str, list[str]], env: dict[str, str], repeats: int) -> dict[str, float]:
    """Median CPU seconds of each command, the commands alternated in every repeat."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for command in commands.values():  # warm the page cache once
        cpu_seconds(command, env)
    for _ in range(repeats):
        for name, command in commands.items():
            samples[name].append(cpu_seconds(command, env))
    return {name: round(statistics.median(values), 3) for name, values in samples.items()}


def largest_packages(venv: Path, count: int = 8) -> dict[str, float]:
    site = next((venv / "lib").glob("python3*/site-packages"))
    sizes = {p.name: size_mb(p) for p in site.iterdir() if p.is_dir()}
    return dict(sorted(sizes.items(), key=lambda item: -item[1])[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "device.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        venv = device_venv(tmp, ROOT)
        device_home = tmp / "device"  # one workspace, used by both installs
        device_insitu, full_insitu = (
            str(venv / "bin" / "insitu"),
            str(Path(sys.prefix) / "bin" / "insitu"),
        )
        pub = publisher(tmp)
        env = dict(os.environ)
        bare = tmp / "bare.py"
        bare.write_text(BARE_TYPER)
        with serving(Path(pub.repo)) as url:
            root = f"{pub.repo}/public/metadata/1.root.json"
            device = device_runner([device_insitu], device_home)
            device("init")
            device("update", "enroll", "--root", root, "--url", url, "--model", "triage")
            pub.publish("model.onnx", "1.0.0", device_home)
            device("update")
            cpu = timed(
                {
                    "anchor_bare_typer_version": [sys.executable, str(bare), "--version"],
                    "anchor_eager_cli_version": [sys.executable, "-c", EAGER],
                    "device_version": [device_insitu, "--version"],
                    "full_version": [full_insitu, "--version"],
                    "device_update_check": [
                        device_insitu,
                        "update",
                        "--check",
                        "--home",
                        str(device_home),
                    ],
                    "full_update_check": [
                        full_insitu,
                        "update",
                        "--check",
                        "--home",
                        str(device_home),
                    ],
                },
                env,
                args.repeats,
            )
        results = {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "repeats": args.repeats,
            "size_mb": {
                "device_venv": size_mb(venv),
                "full_venv": size_mb(Path(sys.prefix)),
                "goal_device": 250,
                "device_largest_packages": largest_packages(venv),
            },
            "cpu_seconds_median": cpu,
            "ratios": {
                "device_version_over_bare_typer": round(
                    cpu["device_version"] / cpu["anchor_bare_typer_version"], 2
                ),
                "eager_cli_over_lazy_cli_version": round(
                    cpu["anchor_eager_cli_version"] / cpu["full_version"], 2
                ),
                "device_update_check_over_bare_typer": round(
                    cpu["device_update_check"] / cpu["anchor_bare_typer_version"], 2
                ),
            },
            "goal_cpu_seconds": 0.3,
        }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
