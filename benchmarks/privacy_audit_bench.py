"""Measured leakage of insitu's own models: membership inference and gradient inversion.

For Adult (../shared/data/adult.csv, or the carried copy) and scikit-learn's digits, it
trains the same MLP non-privately and with DP-SGD at epsilon 8, 3 and 1 (delta 1e-5,
insitu's own ``train``), attacks each with the loss attack and offline LiRA (shadow
models trained by the same recipe, DP shadows for DP targets), and writes AUC and TPR at
1% FPR with bootstrap intervals, the DP bound there, and the wall time of each audit to
benchmarks/results/privacy_audit.json. It also runs the gradient-inversion
demonstration on both data sets.

    .venv/bin/python benchmarks/privacy_audit_bench.py [--shadows 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from insitu.attacks import audit_membership, inversion_demo
from insitu.attacks._target import ShadowRecipe, _make_trainer
from insitu.data import DataSchema, FeatureEncoder, Pseudonymizer, prepare, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.privacy import calibrate_noise
from insitu.training import build_model, evaluate, planned_event, train

RESULTS = Path(__file__).parent / "results" / "privacy_audit.json"
SHARED_ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult.csv"
DELTA = 1e-5
EPSILONS = (None, 8.0, 3.0, 1.0)


def adult(rows: int, seed: int):
    schema = DataSchema.load(builtin_schema("adult"))
    source = SHARED_ADULT if SHARED_ADULT.is_file() else builtin_data("adult")
    frame = read_table(source)
    frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))[:rows]]
    frame = frame.reset_index(drop=True)
    if "record_id" not in frame.columns:
        frame["record_id"] = np.arange(len(frame))
    prepared = prepare(frame, schema, Pseudonymizer(b"b" * 32), source="adult", k=1).frame
    encoder = FeatureEncoder.for_schema(schema)
    return encoder.encode(prepared), encoder.labels(prepared), str(source.name), 1


def digits(seed: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype(np.float32)
    return x, data.target[order].astype(np.int64), "sklearn digits", 10


def train_target(x, y, *, classes, hidden, recipe: ShadowRecipe, seed):
    torch.manual_seed(seed)
    model = build_model("mlp", x.shape[1], hidden=hidden, n_classes=max(2, classes))
    event = None
    if recipe.epsilon is not None:
        planned = planned_event(
            rows=len(y), batch_size=recipe.batch_size, epochs=recipe.epochs, noise_multiplier=1
        )
        sigma = calibrate_noise(
            target_epsilon=recipe.epsilon,
            delta=DELTA,
            sample_rate=planned.sample_rate,
            steps=planned.steps,
        )
        event = planned_event(
            rows=len(y), batch_size=recipe.batch_size, epochs=recipe.epochs, noise_multiplier=sigma
        )
    train(
        model,
        x,
        y,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        event=event,
        max_grad_norm=1.0,
        seed=seed,
    )
    return model.eval(), (None if event is None else event.noise_multiplier)


def run_dataset(name, x, y, source, classes, *, members, hidden, epochs, lr, shadows, seed):
    x_m, y_m, x_n, y_n = x[:members], y[:members], x[members:], y[members:]
    rows = []
    for epsilon in EPSILONS:
        recipe = ShadowRecipe(
            epochs=epochs, batch_size=64, learning_rate=lr, epsilon=epsilon, delta=DELTA
        )
        started = time.perf_counter()
        model, sigma = train_target(
            x_m, y_m, classes=classes, hidden=hidden, recipe=recipe, seed=seed
        )
        train_seconds = time.perf_counter() - started
        _, train_accuracy = evaluate(model, x_m, y_m)
        _, test_accuracy = evaluate(model, x_n, y_n)

        def predict(features, model=model):
            with torch.no_grad():
                return model(torch.from_numpy(features)).numpy()

        out_features = 1 if classes <= 2 else classes
        trainer = _make_trainer([(0, x.shape[1], hidden), (2, hidden, out_features)], recipe)
        started = time.perf_counter()
        audit = audit_membership(
            predict,
            (x_m, y_m),
            (x_n, y_n),
            attacks=("loss", "lira-offline"),
            fprs=(0.01,),
            epsilon=epsilon,
            delta=DELTA if epsilon is not None else 0.0,
            member_ids=[f"m{i}" for i in range(len(y_m))],
            non_member_ids=[f"n{i}" for i in range(len(y_n))],
            shadow_trainer=trainer,
            shadow_models=shadows,
            seed=seed,
        )
        audit_seconds = time.perf_counter() - started
        row = {
            "dataset": name,
            "source": source,
            "epsilon": epsilon,
            "noise_multiplier": sigma,
            "train_accuracy": round(train_accuracy, 4),
            "test_accuracy": round(test_accuracy, 4),
            "train_seconds": round(train_seconds, 2),
            "audit_seconds": round(audit_seconds, 2),
        }
        for result in audit.results:
            point = result.summary.points[0]
            key = result.attack.replace("-", "_")
            row[f"{key}_auc"] = round(result.summary.auc, 4)
            row[f"{key}_auc_ci"] = [
                round(result.summary.auc_low, 4),
                round(result.summary.auc_high, 4),
            ]
            row[f"{key}_tpr_at_1pct"] = round(point.tpr, 4)
            row[f"{key}_tpr_at_1pct_ci"] = [round(point.tpr_low, 4), round(point.tpr_high, 4)]
            row[f"{key}_seconds"] = round(result.seconds, 2)
            row["bound_at_1pct"] = None if point.bound is None else round(point.bound, 4)
            row[f"{key}_above_bound"] = point.above_bound
            row[f"{key}_violation"] = point.violation
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"members": len(y_m), "non_members": len(y_n), "hidden": hidden, "epochs": epochs,
            "learning_rate": lr, "batch_size": 64, "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, object] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": 1, "cpu": platform.processor() or platform.machine()},
        "delta": DELTA,
        "shadow_models": args.shadows,
        "fpr": 0.01,
    }  # fmt: skip
    x, y, source, classes = adult(3000, args.seed)
    common = {"hidden": 64, "lr": 0.5, "shadows": args.shadows, "seed": args.seed}
    results["adult"] = run_dataset(
        "adult", x, y, source, classes, members=1500, epochs=30, **common
    )
    x, y, source, classes = digits(args.seed)
    results["digits"] = run_dataset(
        "digits", x, y, source, classes, members=750, epochs=60, **common
    )
    inversion = {}
    for name, (features, labels, _, n_classes) in {
        "digits": digits(args.seed),
        "adult": adult(2000, args.seed),
    }.items():
        torch.manual_seed(args.seed)
        model = build_model("mlp", features.shape[1], hidden=32, n_classes=max(2, n_classes))
        started_inv = time.perf_counter()
        demo = inversion_demo(model, features, labels, sites=5, records_per_site=16,
                              noise_multiplier=1.0, max_grad_norm=1.0, seed=args.seed)  # fmt: skip
        inversion[name] = demo.to_json() | {"seconds": round(time.perf_counter() - started_inv, 2)}
        print(name, json.dumps(inversion[name]), flush=True)
    results["inversion"] = inversion
    results["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS} in {results['seconds']} s")


if __name__ == "__main__":
    main()
