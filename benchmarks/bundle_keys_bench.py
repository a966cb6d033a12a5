"""What a bundle decryption key in a PKCS#11 token costs at load time, against a file key.

Anchor: a workspace whose decryption key is an X25519 file (``keys/encryption.key``; the
key agreement runs in process). Against it, a workspace made with ``insitu init
--key-uri`` on SoftHSM2, whose decryption key is a P-256 key in the token: the bundle's
recipient entry is ``p256-ecdh`` and each load asks the token for one
``CKM_ECDH1_DERIVE``. Both load the same model (two sizes: a small one, where the key
agreement is most of the difference, and a larger one) with
:func:`insitu.bundle.load_session` (verify, unwrap, decrypt, hash, ONNX Runtime session),
alternated ``--rounds`` times with ``--loads`` loads each; figures are medians. The
unwrapping alone (:func:`data_key_for`: the key agreement, HKDF, AES-GCM) is timed too.
The key is opened once per workspace, as the runtime does (a PKCS#11 login per process).
When swtpm and tpm2-pkcs11 are installed, a third workspace has its decryption key in a
software TPM (an RSA key; ``rsa-oaep-sha256`` entries, one ``C_Decrypt`` with
``CKM_RSA_PKCS_OAEP`` per load; ``tests/_swtpm.py`` starts it, ADR 0020).

    .venv/bin/python benchmarks/bundle_keys_bench.py [--loads 15] [--rounds 3]

Writes benchmarks/results/bundle_keys.json. Needs Debian's softhsm2 (scripts/bootstrap);
the TPM rows need swtpm, tpm2-tools and libtpm2-pkcs11-1.
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
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.bundle import Bundle, BundleVerifier, ModelCard, create_bundle, load_session, schema_of
from insitu.bundle._verify import data_key_for
from insitu.workspace import PIN_ENV, Workspace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests._swtpm import MODULE as TPM_MODULE
from tests._swtpm import SoftwareTpm, missing
from tests.bundle._models import mlp

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-4321"
MODELS = {"small": [108, 64, 1], "large": [512, 2048, 2048, 10]}


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


def _bundle(model: bytes, ws: Workspace, publisher: Ed25519PrivateKey) -> bytes:
    inputs, outputs = schema_of(model)
    card = ModelCard(name="bench", version="1.0.0", inputs=inputs, outputs=outputs)
    return create_bundle(model, card, publisher, recipients=[ws.encryption_public_key])


def _time_ms(action: Any, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bundle_keys.json"
    )
    args = parser.parse_args()
    publisher = Ed25519PrivateKey.generate()
    verifier = BundleVerifier([publisher.public_key()])
    runs: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, int] = {}
    tpm: SoftwareTpm | None = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _softhsm(root)
        homes = {
            "file": Workspace.init(root / "file")[0],
            "token": Workspace.init(
                root / "token", key_uri="pkcs11:token=bench;object=node", pkcs11_module=MODULE
            )[0],
        }
        if missing() is None:  # the RSA decryption key in a software TPM
            tpm = SoftwareTpm(root / "tpm", token="bench-tpm", pin=PIN, so_pin="bench-so-pin")
            os.environ.update(tpm.env)
            homes["tpm"] = Workspace.init(
                root / "tpm-node",
                key_uri="pkcs11:token=bench-tpm;object=node",
                pkcs11_module=TPM_MODULE,
            )[0]
        keys = {which: ws.encryption_key() for which, ws in homes.items()}
        for size, widths in MODELS.items():
            model, _ = mlp(widths)
            sizes[size] = len(model)
            blobs = {which: _bundle(model, ws, publisher) for which, ws in homes.items()}
            for _ in range(args.rounds):
                for which in homes:  # alternated: both see the same machine
                    blob, key = blobs[which], keys[which]
                    found = runs.setdefault(f"{size}_{which}", {})
                    found.setdefault("load_ms", []).extend(
                        _time_ms(lambda b=blob, k=key: load_session(b, verifier, k), args.loads)
                    )
                    parsed = Bundle.parse(blob)
                    found.setdefault("unwrap_ms", []).extend(
                        _time_ms(lambda p=parsed, k=key: data_key_for(p, k), args.loads)
                    )
        if tpm is not None:
            tpm.stop()
    medians = {
        run: {name: round(statistics.median(values), 3) for name, values in found.items()}
        for run, found in runs.items()
    }
    ratios = {
        f"{size}_load_{which}_over_file": round(
            medians[f"{size}_{which}"]["load_ms"] / medians[f"{size}_file"]["load_ms"], 3
        )
        for size in MODELS
        for which in homes
        if which != "file"
    }
    result = {
        "benchmark": "bundle_keys",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
        },
        "settings": {
            "loads": args.loads,
            "rounds": args.rounds,
            "model_bytes": sizes,
            "file": "X25519 in keys/encryption.key (x25519 recipient entry)",
            "token": "P-256 in SoftHSM2, CKM_ECDH1_DERIVE per load (p256-ecdh recipient entry)",
            "tpm": "RSA-3072 in swtpm via tpm2-pkcs11, CKM_RSA_PKCS_OAEP per load "
            "(rsa-oaep-sha256 recipient entry)"
            if "tpm" in homes
            else "not run (swtpm or tpm2-pkcs11 missing)",
        },
        "median": medians,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"median": medians, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
