"""What a signing key in a PKCS#11 token costs: file key, SoftHSM2 and a TPM, in one run.

Anchor: a workspace whose Ed25519 signing key is a file (cryptography signs in process).
Against it, workspaces whose key was generated in a token (``insitu init --key-uri``;
every signature a PKCS#11 ``C_Sign`` call): SoftHSM2 with Ed25519 (``token``) and with
ECDSA P-256 (``token_p256``), and a TPM 2.0 with P-256 (``tpm``: the software TPM swtpm
through tpm2-pkcs11, started here as the tests start it; a hardware TPM is slower
still). All append the same signed ledger entries (one fsync'd transaction each, as
``ledger_bench.py``), sign alone (``sign_ms``: the key's cost without the disk's) and
sign the same bundle, alternated ``--rounds`` times; the figures are medians. The TPM
appends ``--tpm-appends`` entries (it signs in milliseconds).

    .venv/bin/python benchmarks/keys_bench.py [--appends 2000] [--tpm-appends 200] [--rounds 5]

Writes benchmarks/results/keys.json. Needs Debian's softhsm2, swtpm, tpm2-tools and
tpm2-pkcs11 (scripts/bootstrap); without the TPM tools the ``tpm`` figures are left out.
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
from tests._swtpm import MODULE as TPM_MODULE
from tests._swtpm import SoftwareTpm, missing
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


def _tpm(root: Path) -> SoftwareTpm | None:
    """A software TPM with a token "bench", its environment set for this process."""
    why = missing()
    if why is not None:
        print(f"no TPM figures: {why}", file=sys.stderr)
        return None
    tpm = SoftwareTpm(root / "tpm", token="bench", pin=PIN, so_pin="bench-so-pin")
    os.environ.update(tpm.env)
    return tpm


def _appends_per_second(ws: Workspace, count: int) -> float:
    with ws.ledger() as ledger:
        ledger.record("training.round", **PAYLOAD)  # the key is opened at the first write
        started = time.perf_counter()
        for _ in range(count):
            ledger.record("training.round", **PAYLOAD)
        return count / (time.perf_counter() - started)


def _sign_ms(ws: Workspace, count: int) -> float:
    """One signature alone (no fsync): what the key's store costs, whatever the disk."""
    key = ws.signing_key()
    started = time.perf_counter()
    for i in range(count):
        key.sign(i.to_bytes(8, "big") * 4)
    return (time.perf_counter() - started) / count * 1000


def _bundle_ms(ws: Workspace, model: bytes, card: ModelCard) -> float:
    key, recipients = ws.signing_key(), [ws.encryption_public_key]
    started = time.perf_counter()
    for _ in range(20):
        create_bundle(model, card, key, recipients=recipients)
    return (time.perf_counter() - started) / 20 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--tpm-appends", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "keys.json")
    args = parser.parse_args()
    model, _ = mlp([108, 64, 1])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="adult", version="1.0.0", inputs=inputs, outputs=outputs)
    figures: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _softhsm(root)
        tpm = _tpm(root)
        homes = {
            "file": Workspace.init(root / "file")[0],
            "token": Workspace.init(
                root / "token", key_uri="pkcs11:token=bench;object=node", pkcs11_module=MODULE
            )[0],
            "token_p256": Workspace.init(
                root / "token-p256",
                key_uri="pkcs11:token=bench;object=node-p256",
                pkcs11_module=MODULE,
                key_algorithm="p256",
            )[0],
        }
        if tpm is not None:
            homes["tpm"] = Workspace.init(
                root / "tpm-node",
                key_uri="pkcs11:token=bench;object=node",
                pkcs11_module=TPM_MODULE,
            )[0]
        try:
            _measure(homes, figures, args, model, card)
        finally:
            if tpm is not None:
                tpm.stop()
    medians = {
        which: {name: round(statistics.median(values), 2) for name, values in found.items()}
        for which, found in figures.items()
    }
    ratios = {
        f"{which}_{name}_over_file": round(medians[which][name] / medians["file"][name], 3)
        for which in medians
        if which != "file"
        for name in ("appends_per_second", "sign_ms", "bundle_sign_ms")
    }
    result = {
        "benchmark": "keys",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
        },
        "settings": {
            "appends": args.appends,
            "tpm_appends": args.tpm_appends,
            "rounds": args.rounds,
            "token": "SoftHSM2 (Ed25519 and P-256)",
            "tpm": "swtpm through tpm2-pkcs11 (P-256)" if "tpm" in medians else None,
        },
        "median": medians,
        "runs": figures,
        "ratios": ratios,
        "goals": {
            f"{which}_appends_at_least_2000_per_second": medians[which]["appends_per_second"]
            >= GOAL_APPENDS_PER_SECOND
            for which in medians
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"median": medians, "ratios": ratios}, indent=2))


def _measure(
    homes: dict[str, Workspace],
    figures: dict[str, dict[str, list[float]]],
    args: argparse.Namespace,
    model: bytes,
    card: ModelCard,
) -> None:
    for _ in range(args.rounds):
        for which, ws in homes.items():  # alternated: all see the same machine
            fresh = Workspace.open(ws.home)
            count = args.tpm_appends if which == "tpm" else args.appends
            found = figures.setdefault(which, {})
            found.setdefault("appends_per_second", []).append(_appends_per_second(fresh, count))
            found.setdefault("sign_ms", []).append(_sign_ms(fresh, count))
            found.setdefault("bundle_sign_ms", []).append(_bundle_ms(fresh, model, card))


if __name__ == "__main__":
    main()
