"""Federated training on one machine with Flower's own simulation engine.

:func:`simulate` plays every part of a real federation on this machine, through the same
code a real deployment runs:

* the *coordinator* is the workspace the user runs from: it partitions the file, starts
  Flower's ServerApp, and records the run in its ledger;
* each *site* is a full workspace of its own under ``<coordinator>/sites/site-NN``
  (its own keys, pseudonym secret, ledger and privacy budget, kept across runs), which
  prepares its part of the data under the schema and seals it, then trains in Flower
  ClientApps that the simulation engine (Ray) runs in separate processes.

A part of the file is held out by the coordinator for a *central* test accuracy: a
simulation-only evaluation (real sites report only their own held-out accuracy).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from insitu._atomic import atomic_write_bytes, atomic_write_text
from insitu._egress import EgressSite, egress_mod
from insitu.data import (
    ConsentRegistry,
    DataSchema,
    FeatureEncoder,
    Pseudonymizer,
    prepare,
    read_table,
)
from insitu.errors import FederationError, InsufficientDataError, UsageError
from insitu.federated._config import FederationConfig
from insitu.federated._local import evaluate, planned_event
from insitu.federated._models import (
    ModelFn,
    build_model,
    export_onnx,
    get_weights,
    set_weights,
)
from insitu.federated._partition import partition
from insitu.federated._server_app import (
    RoundRecord,
    RoundRecorder,
    build_strategy,
    record_completed,
    run_rounds,
)
from insitu.federated._site_app import SiteClient, SitePlan, prepare_site_data
from insitu.privacy import calibrate_noise
from insitu.workspace import Workspace

__all__ = ["FederatedResult", "min_rows_for", "simulate"]

logger = logging.getLogger(__name__)

#: Above this DP-SGD noise multiplier the gradient signal is lost: a site needs more data.
MAX_WORKABLE_NOISE = 10.0


@dataclass
class FederatedResult:
    """The outcome of a run."""

    run_id: str
    config: FederationConfig
    rounds: list[RoundRecord]
    weights: list[np.ndarray] = field(repr=False)
    model_dir: Path
    site_homes: list[Path]
    central_accuracy: float | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON summary (the training record's body)."""
        return {
            "run_id": self.run_id,
            "config": self.config.to_json(),
            "model_dir": str(self.model_dir),
            "central_accuracy": self.central_accuracy,
            "seconds": round(self.seconds, 2),
            "rounds": [
                {
                    "round": r.round,
                    "sites_ok": r.sites_ok,
                    "failures": r.failures,
                    "accuracy": r.accuracy,
                    "central_accuracy": r.central_accuracy,
                    "loss": r.loss,
                    "epsilon_by_site": r.epsilon_by_site,
                }
                for r in self.rounds
            ],
        }


def min_rows_for(config: FederationConfig) -> int:
    """Smallest site size at which the run's epsilon needs at most ``MAX_WORKABLE_NOISE``."""

    def noise(rows: int) -> float:
        event = planned_event(
            rows=rows,
            batch_size=config.batch_size,
            epochs=config.local_epochs,
            noise_multiplier=1.0,
        )
        try:
            return calibrate_noise(
                target_epsilon=config.epsilon,
                delta=config.delta,
                sample_rate=event.sample_rate,
                steps=event.steps * config.rounds,
            )
        except UsageError:
            return math.inf

    low, high = config.batch_size, config.batch_size
    while noise(high) > MAX_WORKABLE_NOISE:
        low, high = high, high * 2
        if high > 10**9:
            raise UsageError(f"epsilon {config.epsilon} is out of reach at any data size")
    while high - low > max(1, low // 50):
        mid = (low + high) // 2
        if noise(mid) > MAX_WORKABLE_NOISE:
            low = mid
        else:
            high = mid
    return high


def _site_workspace(coordinator: Workspace, index: int, epsilon_budget: float | None) -> Workspace:
    ws, created = Workspace.init(
        coordinator.home / "sites" / f"site-{index:02d}", name=f"site-{index:02d}"
    )
    if created and epsilon_budget is not None:
        from insitu.workspace._config import save_config

        ws.config.sections.setdefault("privacy", {})["epsilon_budget"] = float(epsilon_budget)
        save_config(ws.config_path, ws.config)
        ws = Workspace.open(ws.home)
    return ws


def simulate(  # noqa: PLR0912, PLR0915 -- the run, step by step, reads best in one place
    coordinator: Workspace,
    data: Path | pd.DataFrame,
    config: FederationConfig,
    *,
    schema: DataSchema | None = None,
    label: str | None = None,
    consent: Path | Sequence[tuple[str, str, str]] | None = None,
    site_epsilon_budget: float | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    model_fn: ModelFn | None = None,
    faults: dict[int, str] | None = None,
    strategy_spy: Callable[[Any], None] | None = None,
) -> FederatedResult:
    """Train across ``config.sites`` simulated sites; see the module docstring.

    Args:
        coordinator: the workspace the run is recorded in (sites live under it).
        data: the whole table (a path or a frame).
        config: the run's settings.
        schema: the data schema; without it, one is inferred from ``label``.
        label: the label column when no schema is given.
        consent: a consent CSV (subject,purpose,status) every site imports, or the same
            rows in memory (subject ids are pseudonymized by each site before storage).
        site_epsilon_budget: the budget of sites created by this run (existing sites
            keep theirs).
        on_round: called after each round (progress display).
        model_fn: builds the model from the number of input features (any
            ``torch.nn.Module`` with one logit output); default: ``config.model``.
        faults: site index -> fault (tests of dropouts and poisoning).
        strategy_spy: receives the strategy before the run (tests).

    Raises:
        UsageError: bad settings or a data set that cannot be split as asked.
        InsufficientDataError: a site too small for the requested epsilon.
        FederationError: a round without enough sites.

    """
    from flwr.client import ClientApp
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    started = time.perf_counter()
    frame = data if isinstance(data, pd.DataFrame) else read_table(data)
    source = "data" if isinstance(data, pd.DataFrame) else data.name
    if schema is None:
        if label is None:
            raise UsageError("give a data schema (--schema) or the label column (--label)")
        schema = DataSchema.infer(frame, label=label, name=source.split(".")[0] or "dataset")
    elif label is not None and label != schema.label:
        raise UsageError(f"--label {label!r} differs from the schema's label {schema.label!r}")
    schema.check_columns(frame.columns, source=source)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    # Hold out the coordinator's central test set (simulation only), then split sites.
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(frame))
    n_central = max(1, int(len(frame) * 0.2))
    central_frame = frame.iloc[np.sort(order[:n_central])].reset_index(drop=True)
    pool = frame.iloc[np.sort(order[n_central:])].reset_index(drop=True)
    parts = partition(pool, config.partition, config.sites, label=schema.label, seed=config.seed)

    # Check every site before any workspace or file is created: nothing half-made.
    splits = [
        np.random.default_rng(config.seed + index).random(len(rows)) < config.test_fraction
        for index, rows in enumerate(parts, start=1)
    ]
    if config.privacy == "record":
        needed = min_rows_for(config)
        for index, is_test in enumerate(splits, start=1):
            train_rows = int((~is_test).sum())
            if train_rows < needed:
                raise InsufficientDataError(
                    f"site-{index:02d} would hold {train_rows} training records; epsilon "
                    f"{config.epsilon} over {config.rounds} rounds needs at least {needed} per "
                    f"site (at batch {config.batch_size}); use fewer sites or rounds, or a "
                    "larger epsilon"
                )

    encoder = FeatureEncoder.for_schema(schema, pool)
    central = prepare(
        central_frame, schema, Pseudonymizer(coordinator.secret("pseudonym")), source="central", k=1
    ).frame
    central_x, central_y = encoder.encode(central), encoder.labels(central)
    n_features = len(encoder.names)

    plans: list[SitePlan] = []
    site_homes: list[Path] = []
    for index, (rows, is_test) in enumerate(zip(parts, splits, strict=True), start=1):
        ws = _site_workspace(coordinator, index, site_epsilon_budget)
        site_frame = pool.iloc[rows].reset_index(drop=True)
        train_dir, test_dir = prepare_site_data(
            ws, site_frame, schema, is_test=is_test, source=source
        )
        if consent is not None:
            with ws.ledger() as ledger:
                registry = ConsentRegistry(ledger, Pseudonymizer(ws.secret("pseudonym")))
                if isinstance(consent, Path):
                    registry.import_csv(consent)
                else:
                    # Each site's consent system knows its own subjects only.
                    mine = set(site_frame[schema.subject].astype(str)) if schema.subject else set()
                    registry.change_many([c for c in consent if c[0] in mine])  # type: ignore[misc]
        plans.append(
            SitePlan(
                run_id=run_id,
                site=f"site-{index:02d}",
                home=ws.home.absolute(),
                train_dir=train_dir,
                test_dir=test_dir,
                dataset=schema.name,
                n_features=n_features,
                config=config,
                fault=(faults or {}).get(index, ""),
            )
        )
        site_homes.append(ws.home)

    site_sigma = 0.0
    if config.privacy == "site":
        site_sigma = calibrate_noise(
            target_epsilon=config.epsilon, delta=config.delta, sample_rate=1.0, steps=config.rounds
        )
        plans = [replace(p, site_noise_multiplier=site_sigma) for p in plans]

    def new_model() -> torch.nn.Module:
        if model_fn is not None:
            return model_fn(n_features)
        return build_model(config.model, n_features, hidden=config.hidden)

    plans = [replace(p, model_fn=model_fn) for p in plans]
    torch.manual_seed(config.seed)
    initial_model = new_model()
    initial = ndarrays_to_parameters(get_weights(initial_model))

    def central_eval(
        server_round: int, weights: list[np.ndarray], _: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        model = new_model()
        set_weights(model, weights)
        loss, accuracy = evaluate(model, central_x, central_y)
        return loss, {"accuracy": accuracy}

    with coordinator.ledger() as ledger:
        ledger.record(
            "federation.started",
            run=run_id,
            dataset=schema.name,
            schema_sha256=schema.digest(),
            site_names=[p.site for p in plans],
            **{k: v for k, v in config.to_json().items() if k != "secagg_clipping_range"},
        )

    def record_round(record: RoundRecord) -> None:
        with coordinator.ledger() as ledger:
            ledger.record(
                "federation.round",
                run=run_id,
                round=record.round,
                sites_ok=record.sites_ok,
                failures=record.failures,
                accuracy=record.accuracy,
                central_accuracy=record.central_accuracy,
                epsilon_max=max(record.epsilon_by_site.values(), default=0.0),
            )
        if on_round is not None:
            on_round(record)

    strategy = RoundRecorder(
        build_strategy(config, initial, evaluate_fn=central_eval, site_noise_multiplier=site_sigma),
        required_sites=config.required_sites,
        on_round=record_round,
    )
    if strategy_spy is not None:
        strategy_spy(strategy)
    outcome: dict[str, Any] = {}

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Context) -> None:
        try:
            outcome["weights"] = run_rounds(grid, context, config, strategy)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread below
            outcome["error"] = exc

    def client_fn(context: Context) -> Any:
        return SiteClient(plans[int(context.node_config["partition-id"])]).to_client()

    def site_of(context: Context) -> EgressSite:
        plan = plans[int(context.node_config["partition-id"])]
        return EgressSite(home=plan.home, run_id=plan.run_id, site=plan.site)

    # Outermost: it measures what leaves the site, after SecAgg+ has masked it.
    mods: list[Any] = [egress_mod(site_of)]
    if config.secure_aggregation:
        mods.append(secaggplus_mod)
    if config.privacy == "site":
        mods.append(fixedclipping_mod)  # innermost: clips before anything masks
    client_app = ClientApp(client_fn=client_fn, mods=mods)

    # Flower narrates every stage at INFO and warns that run_simulation is deprecated in
    # favour of `flwr run` (which builds a fresh environment per run: see docs/federated.md).
    flwr_logger = logging.getLogger("flwr")
    previous_level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {
                    "num_cpus": 2,
                    "include_dashboard": False,
                    "log_to_driver": False,
                    "object_store_memory": 256 * 1024 * 1024,
                },
            },
        )
    finally:
        flwr_logger.setLevel(previous_level)
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, FederationError):
            raise error
        raise FederationError(f"the federated run failed: {error}") from error
    if "weights" not in outcome:
        raise FederationError("the federated run ended without a model (see the log above)")

    rounds = [strategy.records[r] for r in sorted(strategy.records)]
    weights: list[np.ndarray] = outcome["weights"]
    model = new_model()
    set_weights(model, weights)
    _, central_accuracy = evaluate(model, central_x, central_y)
    model_dir = _save_model(
        coordinator, run_id=run_id, model=model, encoder=encoder, schema=schema, sample=central_x
    )
    result = FederatedResult(
        run_id=run_id,
        config=config,
        rounds=rounds,
        weights=weights,
        model_dir=model_dir,
        site_homes=site_homes,
        central_accuracy=central_accuracy,
        seconds=time.perf_counter() - started,
    )
    atomic_write_text(model_dir / "record.json", json.dumps(result.to_json(), indent=2) + "\n")
    with coordinator.ledger() as ledger:
        record_completed(
            ledger,
            run_id=run_id,
            rounds=len(rounds),
            central_accuracy=central_accuracy,
            weights=weights,
            onnx=(model_dir / "model.onnx").read_bytes(),
        )
    return result


def _save_model(
    coordinator: Workspace,
    *,
    run_id: str,
    model: torch.nn.Module,
    encoder: FeatureEncoder,
    schema: DataSchema,
    sample: np.ndarray,
) -> Path:
    """Write the PyTorch state, the ONNX export (parity-checked) and the feature names."""
    from insitu.runtime import create_session

    model_dir = coordinator.home / "models" / run_id
    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(model_dir / "model.pt", buffer.getvalue())
    onnx_bytes = export_onnx(model, len(encoder.names))
    session = create_session(onnx_bytes, intra_op_threads=1)
    probe = sample[:256]
    onnx_out = session.run(None, {"features": probe})[0]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(probe)).numpy()
    parity = float(np.max(np.abs(onnx_out - torch_out))) if len(probe) else 0.0
    if parity > 1e-4:
        raise FederationError(f"ONNX export differs from the PyTorch model by {parity:.2e}")
    atomic_write_bytes(model_dir / "model.onnx", onnx_bytes)
    atomic_write_text(
        model_dir / "features.json",
        json.dumps(
            {
                "features": encoder.names,
                "schema": schema.source,
                "schema_sha256": schema.digest(),
                "onnx_parity_max_abs_diff": parity,
            },
            indent=2,
        )
        + "\n",
    )
    return model_dir
