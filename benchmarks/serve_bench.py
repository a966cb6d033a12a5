"""Serving throughput and latency: bare session.run, a plain FastAPI endpoint, insitu serve.

Same model, same machine, one run, loopback only. Models: the Adult MLP (insitu's
``mlp`` family at the Adult schema's width, exported with torch's ONNX exporter) and a
small CNN (two convolutions on 1x28x28 images, 10 classes).

* anchor 1, bare ``session.run`` with one row per call (no HTTP at all);
* anchor 2, the plain endpoint a user would write: FastAPI + uvicorn, a Pydantic body
  of nested float lists, one ``session.run`` per request, the model in a file;
* insitu serve: verified in-memory bundle, micro-batching, the binary body form
  (``application/octet-stream`` + ``X-Insitu-Shape``), and also its JSON form; for the
  Adult MLP also records by column name (``{"records": [{...}]}``, one raw row of the
  carried Adult table), which the server encodes by the data schema its signed card
  carries (``drift_reference["schema"]``, a reference profile as ``insitu bundle``
  makes it). The encoded forms send that record's encoding, so every form asks the same.
* for the Adult MLP, the ``insitu serve`` command itself on a device's workspace (keys
  sealed with a passphrase, the model installed by an update from the tests' in-memory
  TUF repository, the dashboard, the drift monitor and the ledger on): binary and
  records. The in-process server above is the same application without the site's
  extras.

Memory: ``VmRSS`` and ``VmHWM`` (the peak resident set so far) of each server process,
from ``/proc/PID/status``: once it accepts connections, after its first request (insitu
loads a model on first use), and at the end of its run (after every scenario).

Each server runs in its own process (one uvicorn worker); the client is an httpx
``AsyncClient`` bounded in concurrency (1 and 32), in requests and in time; ``wrk`` is
used instead when installed (Debian package ``wrk``): on 2 cores a Python client is the
bottleneck. Every request carries one row. The machine is shared, so scenarios are
interleaved and repeated (``--repeats``), and the median repetition is reported.
Goals: at concurrency 32, >= 3x the plain endpoint's throughput; at concurrency 1, p50
<= 1.2x the plain endpoint's; insitu serve's peak RSS with the Adult MLP <= 150 MB
(the in-process server and the command).

    .venv/bin/python benchmarks/serve_bench.py [--seconds 20] [--repeats 3] [--client wrk|httpx]

Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

PLAIN_SERVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    model_path, port, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    Rows = list[list[float]] if rank == 2 else list[list[list[list[float]]]]

    class Body(BaseModel):
        inputs: Rows

    app = FastAPI()

    @app.post("/predict")
    def predict(body: Body) -> dict:
        x = np.asarray(body.inputs, dtype=np.float32)
        return {"outputs": session.run(None, {name: x})[0].tolist()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    """
)

INSITU_SERVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from insitu.bundle import BundleVerifier
    from insitu.runtime import BundleFile, ModelRuntime
    from insitu.serve import running

    bundle, publisher, device, token, port = sys.argv[1:6]
    verifier = BundleVerifier([Ed25519PublicKey.from_public_bytes(bytes.fromhex(publisher))])
    key = X25519PrivateKey.from_private_bytes(bytes.fromhex(device))
    runtime = ModelRuntime([BundleFile(Path(bundle), verifier=verifier, device_key=key)])
    with running(runtime=runtime, token=token, port=int(port)):
        print("ready", flush=True)
        sys.stdin.read()
    """
)


# The device's keys are sealed (scrypt), as insitu asks of any machine with real data.
CLI_PASSPHRASE = "bench-passphrase"


def _adult_mlp() -> tuple[bytes, tuple[int, ...]]:
    from insitu.data import DataSchema, FeatureEncoder
    from insitu.datasets import builtin_schema
    from insitu.training import build_model, export_onnx

    width = len(FeatureEncoder.for_schema(DataSchema.load(builtin_schema("adult"))).names)
    model = build_model("mlp", width, hidden=32)
    return export_onnx(model, width), (width,)


def _small_cnn() -> tuple[bytes, tuple[int, ...]]:
    import contextlib
    import io
    import logging
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    ).eval()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (torch.zeros(2, 1, 28, 28),),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
        )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, 10)
    return proto.SerializeToString(), (1, 28, 28)


def _adult_record() -> dict[str, Any]:
    """The first row of the carried Adult table as an integrator sends it: raw, no label."""
    import csv
    import gzip

    from insitu.data import DataSchema
    from insitu.datasets import builtin_data, builtin_schema

    schema = DataSchema.load(builtin_schema("adult"))
    with gzip.open(builtin_data("adult"), "rt", encoding="utf-8", newline="") as rows:
        row = next(csv.DictReader(rows))
    record: dict[str, Any] = {schema.subject: row[schema.subject]} if schema.subject else {}
    for column in schema.features:
        record[column] = int(row[column]) if column in schema.numeric else row[column]
    return record


def _schema_reference(schema_name: str) -> dict[str, Any]:
    """A card's drift reference carrying the data schema, as ``insitu bundle`` stores it.

    The histograms are a noisy release of a uniform sample: serving reads only the schema.
    """
    from insitu.data import DataSchema
    from insitu.datasets import builtin_schema
    from insitu.drift import ProfileLayout, combine_releases, noisy_release

    schema = DataSchema.load(builtin_schema(schema_name))
    layout = ProfileLayout.from_schema(schema)
    sample = np.random.default_rng(0).random((64, layout.n_inputs)).astype(np.float32)
    release, _ = noisy_release(layout, sample, None, epsilon=1.0, delta=1e-5)
    return combine_releases(layout, [release], schema=schema.source).to_json()


def _cli_site(model: bytes, card: Any, work: Path) -> tuple[Path, str]:
    """A workspace with ``model`` installed as a device installs it; its home and token.

    Enrolled with the tests' in-memory TUF repository (no network), updated once: what
    ``insitu serve`` then serves is a verified slot, with the dashboard, the drift monitor
    and the ledger of a real site.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from insitu.bundle import create_bundle
    from insitu.update import UpdateClient
    from insitu.workspace import Workspace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' repository
    from tests.update.repository_simulator import BASE_URL, RepositorySimulator

    os.environ["INSITU_PASSPHRASE"] = CLI_PASSPHRASE  # the ledger signs with the site's key
    home = work / f"site-{card.name}"
    workspace, _ = Workspace.init(home, name="site")
    publisher, publisher_enc = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    sim = RepositorySimulator([publisher.public_key()])
    update = workspace.home / "update"
    UpdateClient.enroll(update, root=sim.root_bytes, url=BASE_URL, model=card.name)
    recipients = [workspace.encryption_public_key, publisher_enc.public_key()]
    sim.repo.publish(
        create_bundle(model, card, publisher, recipients=recipients), publisher_key=publisher_enc
    )
    with workspace.ledger() as ledger:
        key = workspace.encryption_key()
        UpdateClient(update, device_key=key, ledger=ledger, fetcher=sim).update()
    return workspace.home, workspace.api_token()


def _memory_mb(pid: int) -> dict[str, float]:
    """Resident set now (``VmRSS``) and its peak so far (``VmHWM``) of process ``pid``."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": found["VmRSS"], "peak_rss_mb": found["VmHWM"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=1)
        except httpx.HTTPError:
            time.sleep(0.2)
        else:
            return
    raise RuntimeError(f"{url} did not come up")


async def _load(
    url: str, make: Any, concurrency: int, requests: int, seconds: float, headers: dict[str, str]
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60, headers=headers) as client:
        for _ in range(min(50, requests)):  # warm-up
            await client.post(url, **make())
        remaining = [requests]
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                started = time.perf_counter()
                response = await client.post(url, **make())
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


_WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format(
    "RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    summary.errors.status + summary.errors.connect + summary.errors.timeout,
    summary.errors.read))
end
"""


def _wrk(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float, work: Path
) -> dict[str, Any]:
    """wrk (C, epoll): a client that is not the bottleneck on a 2-core machine."""
    lines = ['wrk.method = "POST"', 'wrk.body = "' + "".join(f"\\{b:03d}" for b in body) + '"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script = work / f"wrk-{os.getpid()}-{concurrency}.lua"
    script.write_text("\n".join(lines) + _WRK_DONE, encoding="ascii")
    threads = "1" if concurrency == 1 else "2"
    base = ["wrk", "-t", threads, "-c", str(concurrency), "--timeout", "10s", "-s", str(script)]
    subprocess.run([*base, "-d", "1s", url], capture_output=True, check=True)  # warm-up
    output = subprocess.run(
        [*base, "-d", f"{seconds:.0f}s", url], capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in output.splitlines() if x.startswith("RESULT "))
    requests, duration_us, p50_us, p99_us, errors, read_errors = map(int, line.split()[1:])
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": errors,
        "read_errors": read_errors,
        "seconds": round(duration_us / 1e6, 3),
        "throughput_rps": round(requests / (duration_us / 1e6), 1),
        "p50_ms": round(p50_us / 1000, 3),
        "p99_ms": round(p99_us / 1000, 3),
    }


def _bare(model: bytes, shape: tuple[int, ...], count: int) -> dict[str, Any]:
    from insitu.runtime import create_session

    session = create_session(model)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    for _ in range(50):
        session.run(None, {name: x})
    times = []
    for _ in range(count):
        started = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return {
        "calls": count,
        "throughput_rps": round(count / float(np.sum(times)), 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
    }


def _warm(
    procs: dict[str, subprocess.Popen[str]],
    requests: dict[str, tuple[str, bytes, dict[str, str]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Memory of each server as it starts, then after one request (the model loaded)."""
    import httpx

    memory = {which: {"started": _memory_mb(proc.pid)} for which, proc in procs.items()}
    for which, (url, body, headers) in requests.items():
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        if response.status_code != 200:
            raise RuntimeError(f"{which}: {response.status_code} {response.text[:200]}")
        memory[which]["loaded"] = _memory_mb(procs[which].pid)
    return memory


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    """insitu's figures over the plain endpoint's (throughput at c=32, p50 at c=1), and
    records' throughput over the encoded forms'."""
    plain = result["plain"]
    ratios: dict[str, float] = {}
    for which in ("insitu", "cli"):
        ours = result.get(which, {})
        for form in ("binary", "json", "records"):
            if f"c32_{form}" not in ours:
                continue
            ratios[f"c32_throughput_{which}_{form}_over_plain"] = round(
                ours[f"c32_{form}"]["throughput_rps"] / plain["c32_json"]["throughput_rps"], 2
            )
            ratios[f"c1_p50_{which}_{form}_over_plain"] = round(
                ours[f"c1_{form}"]["p50_ms"] / plain["c1_json"]["p50_ms"], 2
            )
        if "c32_records" not in ours:
            continue
        for concurrency in (1, 32):  # what naming columns costs beside their encoding
            for form in ("json", "binary"):
                if f"c{concurrency}_{form}" in ours:
                    ratios[f"c{concurrency}_throughput_{which}_records_over_{form}"] = round(
                        ours[f"c{concurrency}_records"]["throughput_rps"]
                        / ours[f"c{concurrency}_{form}"]["throughput_rps"],
                        2,
                    )
    return ratios


def bench_model(
    label: str,
    model: bytes,
    shape: tuple[int, ...],
    schema_name: str | None,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    from insitu.bundle import ModelCard, create_bundle, schema_of
    from insitu.data import DataSchema
    from insitu.datasets import builtin_schema
    from insitu.runtime import RecordSchema

    publisher, device = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    inputs, outputs = schema_of(model)
    reference = _schema_reference(schema_name) if schema_name else None
    card = ModelCard(
        name=label, version="1.0.0", inputs=inputs, outputs=outputs, drift_reference=reference
    )
    bundle = work / f"{label}.insb"
    bundle.write_bytes(create_bundle(model, card, publisher, recipients=[device.public_key()]))
    plain_model = work / f"{label}.onnx"  # the plain endpoint loads a file, as users do
    plain_model.write_bytes(model)
    token = "bench-token-" + "x" * 24
    env = dict(os.environ)
    record = _adult_record() if schema_name else None
    if (
        schema_name is not None and record is not None
    ):  # the encoded forms send this record's encoding
        records = RecordSchema.of(DataSchema.load(builtin_schema(schema_name)))
        x = np.asarray(records.encode([record]), dtype=np.float32)
    else:
        x = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    as_json = {"json": {"inputs": x.tolist()}}
    raw_headers = {
        "Content-Type": "application/octet-stream",
        "X-Insitu-Shape": ",".join(str(d) for d in x.shape),
    }
    as_raw = {"content": x.tobytes(), "headers": raw_headers}
    result: dict[str, Any] = {
        "input_shape": list(shape),
        "card_carries_schema": schema_name is not None,
        "bare_session_run": _bare(model, shape, args.bare_calls),
    }
    servers: dict[str, tuple[list[str], str]] = {}
    plain_port, insitu_port = _free_port(), _free_port()
    servers["plain"] = (
        [
            sys.executable,
            "-c",
            PLAIN_SERVER,
            str(plain_model),
            str(plain_port),
            str(len(shape) + 1),
        ],
        f"http://127.0.0.1:{plain_port}",
    )
    servers["insitu"] = (
        [
            sys.executable,
            "-c",
            INSITU_SERVER,
            str(bundle),
            publisher.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex(),
            device.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex(),
            token,
            str(insitu_port),
        ],
        f"http://127.0.0.1:{insitu_port}",
    )
    envs = dict.fromkeys(servers, env)
    if schema_name is not None:  # and the CLI on a device's workspace
        home, cli_token = _cli_site(model, card, work)
        cli_port = _free_port()
        insitu_cli = str(Path(sys.executable).with_name("insitu"))
        servers["cli"] = (
            [insitu_cli, "serve", "--home", str(home), "--port", str(cli_port)],
            f"http://127.0.0.1:{cli_port}",
        )
        envs["cli"] = env | {"INSITU_PASSPHRASE": CLI_PASSPHRASE}  # to open the slot
    procs = {
        which: subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=envs[which],
        )
        for which, (command, _) in servers.items()
    }
    json_body = json.dumps(as_json["json"]).encode()
    json_headers = {"Content-Type": "application/json"}
    plain_base, insitu_base = servers["plain"][1], servers["insitu"][1]
    auth = {"Authorization": f"Bearer {token}"}
    insitu_url = f"{insitu_base}/v1/models/{label}/predict"
    # (server, form) -> (url, body, headers, httpx kwargs)
    scenarios = {
        ("plain", "json"): (plain_base + "/predict", json_body, json_headers, as_json, {}),
        ("insitu", "binary"): (insitu_url, x.tobytes(), raw_headers, as_raw, auth),
        ("insitu", "json"): (insitu_url, json_body, json_headers, as_json, auth),
    }
    if record is not None:
        as_records = {"json": {"records": [record]}}
        records_body = json.dumps(as_records["json"]).encode()
        scenarios["insitu", "records"] = (insitu_url, records_body, json_headers, as_records, auth)
        cli_auth = {"Authorization": f"Bearer {cli_token}"}
        cli_url = f"{servers['cli'][1]}/v1/models/{label}/predict"
        scenarios["cli", "binary"] = (cli_url, x.tobytes(), raw_headers, as_raw, cli_auth)
        scenarios["cli", "records"] = (cli_url, records_body, json_headers, as_records, cli_auth)
    try:
        _wait_ready(plain_base + "/docs", procs["plain"])
        _wait_ready(insitu_base + "/healthz", procs["insitu"])
        first = {
            "plain": (plain_base + "/predict", json_body, json_headers),
            "insitu": (insitu_url, json_body, {**json_headers, **auth}),
        }
        if "cli" in servers:
            _wait_ready(servers["cli"][1] + "/healthz", procs["cli"])
            first["cli"] = (cli_url, json_body, {**json_headers, **cli_auth})
        memory = _warm(procs, first)
        # The machine is shared: scenarios are interleaved, repeated, and the median
        # repetition (by throughput) is reported, so that a burst of other work hits
        # every server alike.
        for concurrency in (1, 32):
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for _ in range(args.repeats):
                for key, (url, body, form_headers, httpx_kwargs, headers) in scenarios.items():
                    if args.client == "wrk":
                        figures = _wrk(
                            url, body, {**form_headers, **headers}, concurrency, args.seconds, work
                        )
                    else:
                        figures = asyncio.run(
                            _load(
                                url,
                                lambda kw=httpx_kwargs: kw,
                                concurrency,
                                args.requests,
                                args.seconds,
                                headers,
                            )
                        )
                    runs.setdefault(key, []).append(figures)
                    print(label, key, figures, flush=True)
            for (which, form), repeats in runs.items():
                ordered = sorted(repeats, key=lambda f: f["throughput_rps"])
                median = dict(ordered[len(ordered) // 2])
                median["repeats_throughput_rps"] = [f["throughput_rps"] for f in repeats]
                result.setdefault(which, {})[f"c{concurrency}_{form}"] = median
        for which, proc in procs.items():
            memory[which]["end"] = _memory_mb(proc.pid)
    finally:
        for proc in procs.values():
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            proc.wait(timeout=30)
    result["memory_mb"] = memory
    result["ratios"] = ratios = _ratios(result)
    peaks = {which: figures["end"]["peak_rss_mb"] for which, figures in memory.items()}
    for which in ("insitu", "cli"):
        if which in peaks:
            ratios[f"peak_rss_{which}_over_plain"] = round(peaks[which] / peaks["plain"], 2)
    result["goals"] = {
        "c32_throughput_at_least_3x": ratios["c32_throughput_insitu_binary_over_plain"] >= 3,
        "c1_p50_at_most_1.2x": ratios["c1_p50_insitu_binary_over_plain"] <= 1.2,
    }
    if schema_name:  # the Adult MLP: the device's model
        result["goals"]["insitu_peak_rss_at_most_150mb"] = peaks["insitu"] <= 150
        result["goals"]["cli_peak_rss_at_most_150mb"] = peaks["cli"] <= 150
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per scenario, at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="per scenario, at most")
    parser.add_argument("--bare-calls", type=int, default=2000)
    parser.add_argument("--models", default="adult-mlp,small-cnn", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument(
        "--client",
        choices=["wrk", "httpx"],
        default="wrk" if shutil.which("wrk") else "httpx",
        help="load generator (wrk when installed: Debian package 'wrk')",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "serve.json"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "benchmark": "serve",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
        },
        "settings": {
            "repeats": args.repeats,
            "requests": args.requests,
            "seconds": args.seconds,
            "rows_per_request": 1,
            "client": args.client,
            "insitu": {"max_batch_rows": 256, "max_wait_ms": 1.0},
            "cli": "insitu serve --home DEVICE (Adult MLP; keys sealed; site extras on)",
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = (("adult-mlp", _adult_mlp, "adult"), ("small-cnn", _small_cnn, None))
        for label, build, schema_name in models:
            if label not in args.models.split(","):
                continue
            model, shape = build()
            results["models"][label] = bench_model(
                label, model, shape, schema_name, args, Path(tmp)
            )
    results["machine"]["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for label, figures in results["models"].items():
        print(label, figures["ratios"], figures["goals"])
        print(label, "memory (MB)", figures["memory_mb"])


if __name__ == "__main__":
    main()
