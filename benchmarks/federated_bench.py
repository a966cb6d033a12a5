"""Federated training: accuracy under DP, cost per round against plain Flower, and scale.

All on ../shared/data/adult.csv (fnlwgt dropped; schema inferred, simulation only), on
this machine, in one run per part:

* ``accuracy``: a centralized non-private baseline (the same logistic model, trained on
  all training rows at once), federated non-private, and federated with record-level DP
  (DP-SGD) at epsilon 0.5, 1, 3 and 8 (delta 1e-5), IID and label-skewed (Dirichlet 2.0)
  over 5 sites, 10 rounds, SecAgg+ on;
* ``overhead``: wall time per round of plain Flower FedAvg (a NumPyClient doing the same
  local SGD and the same local evaluation on in-memory data, no DP, no secure
  aggregation, no ledger) against insitu (DP-SGD, SecAgg+, sealed data, consent, budgets,
  ledgers), and insitu without SecAgg+ to show where the time goes, at 5 and 20 sites;
* ``scale``: 100 sites x 5 rounds: wall time and peak memory of all processes.

    .venv/bin/python benchmarks/federated_bench.py [accuracy] [overhead] [scale]

Writes benchmarks/results/federated.json (parts not run keep their previous figures).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.errors import InsufficientDataError
from insitu.federated import FederationConfig, simulate
from insitu.training import build_model, evaluate, get_weights, set_weights, train
from insitu.workspace import Workspace

ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult.csv"
OUT = Path(__file__).parent / "results" / "federated.json"


def load() -> pd.DataFrame:
    return read_table(ADULT).drop(columns=["fnlwgt"])


def adult_schema(frame: pd.DataFrame) -> DataSchema:
    """The inferred schema plus the public feature engineering of the package's schema.

    Log scaling of the heavy-tailed amounts and bins of age, hours and education: a
    function of public knowledge about census data, identical at every site, so choosing
    it spends no site's privacy budget.
    """
    doc = dict(DataSchema.infer(frame, label="income", name="adult").source)
    features = dict(doc["features"])
    features["transforms"] = {"capital_gain": "log", "capital_loss": "log"}
    features["bins"] = {
        "age": [25, 30, 35, 40, 45, 50, 55, 60, 65],
        "hr_per_week": [35, 40, 41, 50],
        "education_num": [9, 10, 13, 14],
    }
    doc["features"] = features
    return DataSchema.from_dict(doc)


def centralized_baseline(frame: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """Same split as simulate(): 20% held out, the logistic model trained on the rest.

    Trained by SGD like the sites (20 epochs), and by scikit-learn's L-BFGS to
    convergence, the usual reference figure for this data set.
    """
    from sklearn.linear_model import LogisticRegression

    schema = adult_schema(frame)
    order = np.random.default_rng(seed).permutation(len(frame))
    n_test = int(len(frame) * 0.2)
    test, pool = frame.iloc[np.sort(order[:n_test])], frame.iloc[np.sort(order[n_test:])]
    encoder = FeatureEncoder.for_schema(schema, pool)

    def xy(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        prepared = part.copy()
        for column in schema.numeric:
            prepared[column] = pd.to_numeric(prepared[column])
        return encoder.encode(prepared), encoder.labels(prepared)

    x, y = xy(pool)
    tx, ty = xy(test)
    torch.manual_seed(seed)
    model = build_model("logistic", x.shape[1])
    train(
        model,
        x,
        y,
        epochs=20,
        batch_size=256,
        learning_rate=0.5,
        event=None,
        max_grad_norm=1.0,
        seed=seed,
    )
    reference = LogisticRegression(max_iter=5000).fit(x, y)
    return {
        "sgd_logistic": round(evaluate(model, tx, ty)[1], 4),
        "sklearn_lbfgs_logistic": round(float(reference.score(tx, ty)), 4),
    }


def fed(home: Path, frame: pd.DataFrame, **settings) -> dict:
    ws, _ = Workspace.init(home)
    config = FederationConfig(**settings)
    result = simulate(ws, frame, config, schema=adult_schema(frame), site_epsilon_budget=1000.0)
    per_round = [r.central_accuracy for r in result.rounds]
    return {
        "central_accuracy": round(result.central_accuracy or 0.0, 4),
        "accuracy_by_round": [round(a or 0.0, 4) for a in per_round],
        "epsilon_max": round(max(result.rounds[-1].epsilon_by_site.values(), default=0.0), 3),
        "seconds": round(result.seconds, 1),
    }


def accuracy_part(frame: pd.DataFrame, tmp: Path) -> dict:
    results: dict = {"centralized_non_private": centralized_baseline(frame)}
    print("centralized", results["centralized_non_private"], flush=True)
    # Label skew: Dirichlet(0.5) left a site with 292 training records in one draw, too few
    # for epsilon 0.5 at any workable noise (insitu refuses, naming the smallest size);
    # Dirichlet(2.0) keeps every site trainable at every epsilon here. Settings were tuned
    # on this public data set (a handful of runs at epsilon 1, charged to no site): more
    # local epochs at a lower rate on IID data; fewer, smaller steps under label skew, where
    # long local training drifts apart. Non-private runs take half the rate (0.5): without
    # clipping their steps are larger, and 0.5 was their best.
    splits = {
        "iid": {"batch_size": 256, "local_epochs": 5, "learning_rate": 1.0},
        "dirichlet:2.0": {"batch_size": 128, "local_epochs": 2, "learning_rate": 1.0},
    }
    for split, extra in splits.items():
        rows: dict = {"settings": extra}
        common = {"sites": 5, "rounds": 10, "partition": split, **extra}
        rows["federated_non_private"] = fed(
            tmp / f"np-{split}", frame, privacy="none", **{**common, "learning_rate": 0.5}
        )
        print(split, "non-private", rows["federated_non_private"], flush=True)
        for eps in (0.5, 1.0, 3.0, 8.0):
            key = f"record_dp_epsilon_{eps:g}"
            try:
                rows[key] = fed(
                    tmp / f"dp{eps}-{split}", frame, privacy="record", epsilon=eps, **common
                )
            except InsufficientDataError as exc:
                # insitu refuses settings this small a site cannot afford; say so, and
                # measure the nearest affordable setting (one local epoch per round).
                print(split, eps, "refused:", exc, flush=True)
                rows[key] = {
                    "refused": str(exc),
                    "with_one_local_epoch": fed(
                        tmp / f"dp{eps}-{split}-le1",
                        frame,
                        privacy="record",
                        epsilon=eps,
                        **{**common, "local_epochs": 1},
                    ),
                }
            print(split, eps, rows[f"record_dp_epsilon_{eps:g}"], flush=True)
        results[split] = rows
    return results


# -- plain Flower anchor -------------------------------------------------------------


def plain_flower_seconds_per_round(
    frame: pd.DataFrame,
    sites: int,
    rounds: int,
    *,
    local_epochs: int = 1,
    learning_rate: float = 2.0,
) -> float:
    """Plain Flower FedAvg with the same model and local SGD, data in memory."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    schema = DataSchema.infer(frame, label="income", name="adult")
    prepared = frame.copy()
    for column in schema.numeric:
        prepared[column] = pd.to_numeric(prepared[column])
    encoder = FeatureEncoder.for_schema(schema, prepared)
    x, y = encoder.encode(prepared), encoder.labels(prepared)
    parts = np.array_split(np.random.default_rng(0).permutation(len(x)), sites)

    class Plain(NumPyClient):
        def __init__(self, idx):
            self.idx = idx

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            model = build_model("logistic", x.shape[1])
            set_weights(model, parameters)
            train(
                model,
                x[self.idx],
                y[self.idx],
                epochs=local_epochs,
                batch_size=256,
                learning_rate=learning_rate,
                event=None,
                max_grad_norm=1.0,
                seed=0,
            )
            return get_weights(model), len(self.idx), {}

        def evaluate(self, parameters, config):
            # The same work insitu's sites do each round: the global model on local rows.
            model = build_model("logistic", x.shape[1])
            set_weights(model, parameters)
            loss, accuracy = evaluate(model, x[self.idx], y[self.idx])
            return loss, len(self.idx), {"accuracy": accuracy}

    def client_fn(context: Context):
        return Plain(parts[int(context.node_config["partition-id"])]).to_client()

    initial = ndarrays_to_parameters(get_weights(build_model("logistic", x.shape[1])))
    marks: list[float] = []

    class Timed(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            marks.append(time.perf_counter())
            return super().aggregate_fit(server_round, results, failures)

    def server_fn(context: Context):
        strategy = Timed(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_available_clients=sites,
            min_fit_clients=sites,
            min_evaluate_clients=sites,
            initial_parameters=initial,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    started = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
        },
    )
    # Rounds after the first: Ray's start-up is the same for both and is not a round.
    return (
        (marks[-1] - marks[0]) / (len(marks) - 1)
        if len(marks) > 1
        else time.perf_counter() - started
    )


def insitu_seconds_per_round(
    frame: pd.DataFrame,
    tmp: Path,
    sites: int,
    rounds: int,
    *,
    secure_aggregation: bool = True,
    local_epochs: int = 1,
    learning_rate: float = 2.0,
) -> float:
    marks: list[float] = []
    ws, _ = Workspace.init(tmp / f"overhead-{sites}-{secure_aggregation}-{local_epochs}")
    config = FederationConfig(
        sites=sites,
        rounds=rounds,
        privacy="record",
        epsilon=8.0,
        secure_aggregation=secure_aggregation,
        local_epochs=local_epochs,
        learning_rate=learning_rate,
    )
    simulate(
        ws,
        frame,
        config,
        label="income",
        site_epsilon_budget=1000.0,
        on_round=lambda _: marks.append(time.perf_counter()),
    )
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def overhead_part(frame: pd.DataFrame, tmp: Path) -> dict:
    """Per round, at one local epoch (SecAgg+'s fixed cost weighs most) and at the tuned
    settings of the accuracy part (5 local epochs), the anchor doing the same local work."""
    results: dict = {"load_before": [round(x, 2) for x in os.getloadavg()]}
    for label, local in (("", {}), ("_5_local_epochs", {"local_epochs": 5, "learning_rate": 1.0})):
        for sites in (5, 20):
            plain = plain_flower_seconds_per_round(frame, sites, 4, **local)
            ours = insitu_seconds_per_round(frame, tmp, sites, 4, **local)
            no_secagg = insitu_seconds_per_round(
                frame, tmp, sites, 4, secure_aggregation=False, **local
            )
            results[f"{sites}_sites{label}"] = {
                "plain_flower_fedavg_s_per_round": round(plain, 2),
                "insitu_dp_secagg_s_per_round": round(ours, 2),
                "insitu_over_anchor": round(ours / plain, 2),
                "insitu_dp_without_secagg_s_per_round": round(no_secagg, 2),
            }
            print(sites, label, results[f"{sites}_sites{label}"], flush=True)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _total_rss_mb() -> float:
    total = 0
    for pid in (p.name for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"ray" not in cmdline and int(pid) != os.getpid():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def scale_part(frame: pd.DataFrame, tmp: Path) -> dict:
    peak = [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _total_rss_mb())
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    ws, _ = Workspace.init(tmp / "scale")
    config = FederationConfig(sites=100, rounds=5, privacy="record", epsilon=8.0, batch_size=64)
    result = simulate(ws, frame, config, schema=adult_schema(frame), site_epsilon_budget=1000.0)
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    return {
        "sites": 100,
        "rounds": 5,
        "wall_seconds": round(seconds, 1),
        "peak_rss_mb_all_processes": round(peak[0]),
        "central_accuracy": round(result.central_accuracy or 0.0, 4),
    }


def main() -> None:
    parts = sys.argv[1:] or ["accuracy", "overhead", "scale"]
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    frame = load()
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            started = time.perf_counter()
            results[part] = globals()[f"{part}_part"](frame, Path(tmp))
            results[part]["benchmark_seconds"] = round(time.perf_counter() - started, 1)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{part}: written to {OUT}", flush=True)


if __name__ == "__main__":
    main()
