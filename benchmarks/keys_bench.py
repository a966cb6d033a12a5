"""What a signing key in a PKCS#11 token costs: file key and SoftHSM2 token, in one run.

Anchor: a workspace whose Ed25519 signing key is a file (cryptography signs in process).
Against it: a workspace whose key was generated in a SoftHSM2 token (``insitu init
--key-uri``; every signature a PKCS#11 ``C_Sign`` call). Both append the same signed
ledger entries (one fsync'd transaction each, as ``ledger_bench.py``) and sign the same
bundle, alternated ``--rounds`` times; the figures are medians.

    .venv/bin/python benchmarks/keys_bench.py [--appends 2000] [--rounds 5]

Writes benchmarks/results/keys.json. Needs Debian's softhsm2 (scripts/bootstrap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from insitu.bundle import ModelCard, create_bundle, schema_of
from insitu.workspace import PIN_ENV, Workspace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.bundle._models import mlp

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-4321"
PAYLOAD = {"model": "adult-income", "round": 7, "accuracy": 0.8412, "epsilon_spent": 1.25}
GOAL_APPENDS_PER_SECOND = 2000


def _softhsm(root: Path) -> None:
    store = root / "tokens"
    store.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {store}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = PIN
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", "bench"),
            *("--pin", PIN, "--so-pin", "bench-so-pin"),
        ],
        check=True,
        capture_output=True,
    )


def _appends_per_second(ws: Workspace, count: int) -> float:
    with ws.ledger() as ledger:
        ledger.record("training.round", **PAYLOAD)  # the key is opened at the first write
        started = time.perf_counter()
        for _ in range(count):
            ledger.record("training.round", **PAYLOAD)
        return count / (time.perf_counter() - started)


def _bundle_ms(ws: Workspace, model: bytes, card: ModelCard) -> float:
    key, recipients = ws.signing_key(), [ws.encryption_public_key]
    started = time.perf_counter()
    for _ in range(20):
        create_bundle(model, card, key, recipients=recipients)
    return (time.perf_counter() - started) / 20 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "keys.json")
    args = parser.parse_args()
    model, _ = mlp([108, 64, 1])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="adult", version="1.0.0", inputs=inputs, outputs=outputs)
    figures: dict[str, dict[str, list[float]]] = {"file": {}, "token": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _softhsm(root)
        homes = {
            "file": Workspace.init(root / "file")[0],
            "token": Workspace.init(
                root / "token", key_uri="pkcs11:token=bench;object=node", pkcs11_module=MODULE
            )[0],
        }
        for _ in range(args.rounds):
            for which, ws in homes.items():  # alternated: both see the same machine
                fresh = Workspace.open(ws.home)
                figures[which].setdefault("appends_per_second", []).append(
                    _appends_per_second(fresh, args.appends)
                )
                figures[which].setdefault("bundle_sign_ms", []).append(
                    _bundle_ms(fresh, model, card)
                )
    medians = {
        which: {name: round(statistics.median(values), 2) for name, values in found.items()}
        for which, found in figures.items()
    }
    result = {
        "benchmark": "keys",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
        },
        "settings": {"appends": args.appends, "rounds": args.rounds, "token": "SoftHSM2"},
        "median": medians,
        "runs": figures,
        "ratios": {
            "token_appends_over_file": round(
                medians["token"]["appends_per_second"] / medians["file"]["appends_per_second"], 3
            ),
            "token_bundle_sign_over_file": round(
                medians["token"]["bundle_sign_ms"] / medians["file"]["bundle_sign_ms"], 3
            ),
        },
        "goals": {
            "token_appends_at_least_2000_per_second": medians["token"]["appends_per_second"]
            >= GOAL_APPENDS_PER_SECOND
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"median": medians, "ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
