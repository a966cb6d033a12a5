"""Federated training on one machine with Flower's own simulation engine.

:func:`simulate` plays every part of a real federation on this machine, through the same
code a real deployment runs:

* the *coordinator* is the workspace the user runs from: it partitions the file, starts
  Flower's ServerApp, and records the run in its ledger;
* each *site* is a full workspace of its own under ``<coordinator>/sites/site-NN``
  (its own keys, pseudonym secret, ledger and per-subject privacy budget, kept across
  runs), which prepares its part of the data under the schema and seals it, then trains
  in Flower ClientApps that the simulation engine (Ray) runs in separate processes.

A part of the file is held out by the coordinator for a *central* test accuracy: a
simulation-only evaluation (real sites report only noisy counts on their own held-out
records, at the final round). Which rows are held out, and which site holds each row,
follow each row's subject (a keyed token), never its position: the same person is at
the same simulated site in every run, whatever the file is called or its order.

Invariant (honest outcomes): a run either completes every round with at least the
required sites and records ``federation.completed`` with its model, or records
``federation.failed`` naming the round, the sites and the reason, writes no model and
raises. A run that trained nothing never looks like a success.

Ray is closed and quiet (:func:`_closed_ray`): each run's cluster lives in a private
directory removed after the run, refuses any process without this process's token, and
dials nothing but the loopback address (docs/federated.md, "Ray, closed and quiet").
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from insitu._atomic import atomic_write_bytes, atomic_write_text
from insitu.audit import events
from insitu.data import (
    ArraySchema,
    ConsentRegistry,
    DataSchema,
    FeatureEncoder,
    InferredSchema,
    Pseudonymizer,
    infer_schema,
    prepare,
    read_table,
    subject_keys,
    subject_tokens,
    token_uniform,
)
from insitu.errors import FederationError, InsufficientDataError, SchemaError, UsageError
from insitu.federated._arrays import ArrayRun, array_inputs, save_array_model
from insitu.federated._config import MAX_SITE_WEIGHT, FederationConfig
from insitu.federated._defaults import (
    RoundKeeper,
    centered,
    central_baseline,
    fold_centering,
    uses_centering,
)
from insitu.federated._egress import EgressSite, egress_mod
from insitu.federated._groups import record_groups
from insitu.federated._partition import partition
from insitu.federated._server_app import (
    RoundRecord,
    RoundRecorder,
    build_strategy,
    record_completed,
    record_failed,
    run_rounds,
)
from insitu.federated._site_app import SiteClient, SitePlan, prepare_site_data
from insitu.privacy import PrivacyEvent, SubjectBudget, calibrate_noise, rdp_noise_multiplier
from insitu.training import (
    ModelFn,
    build_model,
    evaluate,
    export_onnx,
    get_weights,
    onnx_parity,
    planned_event,
    set_weights,
)
from insitu.workspace import Workspace

__all__ = ["FederatedResult", "SiteSummary", "min_rows_for", "simulate"]

logger = logging.getLogger(__name__)

#: Above this DP-SGD noise multiplier the gradient signal is lost: a site needs more data.
MAX_WORKABLE_NOISE = 10.0
#: Share of the file the coordinator holds out for the central (simulation-only) accuracy.
CENTRAL_FRACTION = 0.2
#: Ray's accelerators besides GPUs, declared absent: detecting a TPU (any ``/dev/vfio``
#: device counts) makes Ray ask Google's metadata server what it is.
_NO_ACCELERATORS = {"TPU": 0.0, "NPU": 0.0, "HPU": 0.0, "neuron_cores": 0.0, "RBLN": 0.0}
#: Variables that would hand the run to another Ray: the address of a running cluster
#: (Flower would join it instead of starting the run's own) and a token file.
_FOREIGN_RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")


@dataclass(frozen=True)
class SiteSummary:
    """One simulated site after a run, read from its own ledger (simulation only)."""

    site: str
    epsilon_run: float
    epsilon_spent_max: float
    excluded_over_budget: int

    def to_json(self) -> dict[str, Any]:
        """As in the run's JSON."""
        return {
            "site": self.site,
            "epsilon_run": self.epsilon_run,
            "epsilon_spent_max": self.epsilon_spent_max,
            "excluded_over_budget": self.excluded_over_budget,
        }


@dataclass
class FederatedResult:
    """The outcome of a completed run."""

    run_id: str
    config: FederationConfig
    rounds: list[RoundRecord]
    weights: list[np.ndarray] = field(repr=False)
    model_dir: Path
    site_homes: list[Path]
    central_accuracy: float | None
    seconds: float
    sites: list[SiteSummary] = field(default_factory=list)
    #: One line per thing the user should know and fix (e.g. a column dropped as an
    #: identifier when the schema was inferred).
    warnings: list[str] = field(default_factory=list)
    #: A non-private logistic regression on the pooled records, on the same held-out rows
    #: (simulation only; ``None`` when it cannot be computed, e.g. more than two classes).
    baseline_accuracy: float | None = None
    #: The round whose model was kept, and why (:class:`~insitu.federated._defaults.RoundKeeper`).
    kept_round: int | None = None
    kept_because: str = ""

    @property
    def epsilon_run(self) -> float:
        """The run's epsilon: the most any site spent on a record in this run."""
        return max((s.epsilon_run for s in self.sites), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """A JSON summary (the training record's body)."""
        return {
            "run_id": self.run_id,
            "config": self.config.to_json(),
            "model_dir": str(self.model_dir),
            "central_accuracy": self.central_accuracy,
            "seconds": round(self.seconds, 2),
            "private": self.config.privacy != "none",
            "reproducible": self.config.privacy == "none",
            "epsilon_run": self.epsilon_run,
            "sites": [s.to_json() for s in self.sites],
            "warnings": self.warnings,
            "baseline_accuracy": self.baseline_accuracy,
            "kept_round": self.kept_round,
            "kept_because": self.kept_because,
            "rounds": [r.to_json() for r in self.rounds],
        }


def min_rows_for(config: FederationConfig) -> int:
    """Smallest site size at which the run's epsilon needs at most ``MAX_WORKABLE_NOISE``.

    An estimate by the (fast, slightly looser) RDP bound: it errs towards larger sizes.
    """

    def noise(rows: int) -> float:
        event = planned_event(
            rows=rows,
            batch_size=config.batch_for(rows),
            epochs=config.local_epochs,
            noise_multiplier=1.0,
        )
        try:
            return rdp_noise_multiplier(
                target_epsilon=config.epsilon,
                delta=config.delta,
                sample_rate=event.sample_rate,
                steps=event.steps * config.rounds,
            )
        except UsageError:
            return math.inf

    low = high = config.batch_for(1)
    while noise(high) > MAX_WORKABLE_NOISE:
        low, high = high, high * 2
        if high > 10**9:
            raise UsageError(f"epsilon {config.epsilon} is out of reach at any data size")
    while high - low > max(1, low // 20):
        mid = (low + high) // 2
        if noise(mid) > MAX_WORKABLE_NOISE:
            low = mid
        else:
            high = mid
    return high


def _site_workspace(coordinator: Workspace, index: int, epsilon_budget: float | None) -> Workspace:
    ws, created = Workspace.init(
        coordinator.site_home(f"site-{index:02d}"), name=f"site-{index:02d}"
    )
    if created and epsilon_budget is not None:
        ws = ws.with_config("privacy", epsilon_budget=float(epsilon_budget))
    return ws


@dataclass(frozen=True)
class _Split:
    """The coordinator's split of the file: central held-out rows and each site's rows."""

    central: pd.DataFrame
    pool: pd.DataFrame
    parts: list[np.ndarray]


def _split(
    coordinator: Workspace,
    frame: pd.DataFrame,
    config: FederationConfig,
    *,
    label: str,
    subject: str | None,
) -> _Split:
    """Central held-out rows and the sites' parts, each decided by the row's subject."""
    tokens = subject_tokens(frame, Pseudonymizer(coordinator.secret("pseudonym")), subject=subject)
    central = token_uniform(tokens, part=0) < CENTRAL_FRACTION
    pool = frame[~central].reset_index(drop=True)
    uniform = token_uniform(tokens[~central].reset_index(drop=True), part=1)
    parts = partition(pool, config.partition, config.sites, label=label, uniform=uniform)
    if config.privacy == "record":
        needed = min_rows_for(config)
        for index, rows in enumerate(parts, start=1):
            train_rows = int(len(rows) * (1 - config.test_fraction))
            if train_rows < needed:
                raise InsufficientDataError(
                    f"site-{index:02d} would hold about {train_rows} training records; epsilon "
                    f"{config.epsilon} over {config.rounds} rounds needs at least {needed} per "
                    f"site (at batch {config.batch_for(needed)}); use fewer sites or rounds, or a "
                    "larger epsilon"
                )
    return _Split(frame[central].reset_index(drop=True), pool, parts)


def _site_weights(parts: list[np.ndarray]) -> list[int]:
    """Weights fixed before the run: each part's planned size, scaled to MAX_SITE_WEIGHT."""
    largest = max(len(p) for p in parts)
    return [max(1, round(MAX_SITE_WEIGHT * len(p) / largest)) for p in parts]


def _make_sites(
    sites: list[Workspace],
    split: _Split,
    schema: DataSchema,
    config: FederationConfig,
    *,
    run_id: str,
    n_features: int,
    source: str,
    consent: Path | Sequence[tuple[str, str, str]] | None,
    model_fn: ModelFn | None,
    faults: dict[int, str],
) -> list[SitePlan]:
    """Each site's prepared and sealed part, consent, and its plan."""
    plans: list[SitePlan] = []
    weights = _site_weights(split.parts)
    for index, (ws, rows, weight) in enumerate(
        zip(sites, split.parts, weights, strict=True), start=1
    ):
        site_frame = split.pool.iloc[rows].reset_index(drop=True)
        train_dir, test_dir = prepare_site_data(
            ws, site_frame, schema, test_fraction=config.test_fraction, source=source
        )
        if consent is not None:
            _import_consent(ws, consent, site_frame, schema)
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
                model_fn=model_fn,
                weight=weight,
                fault=faults.get(index, ""),
            )
        )
    if config.privacy == "site":
        sigma = calibrate_noise(
            target_epsilon=config.epsilon, delta=config.delta, sample_rate=1.0, steps=config.rounds
        )
        plans = [replace(p, site_noise_multiplier=sigma) for p in plans]
    return plans


def _import_consent(
    ws: Workspace,
    consent: Path | Sequence[tuple[str, str, str]],
    site_frame: pd.DataFrame,
    schema: DataSchema,
) -> None:
    with ws.ledger() as ledger:
        registry = ConsentRegistry(ledger, Pseudonymizer(ws.secret("pseudonym")))
        if isinstance(consent, Path):
            registry.import_csv(consent)
        else:
            # Each site's consent system knows its own subjects only.
            mine = set(site_frame[schema.subject].astype(str)) if schema.subject else set()
            registry.change_many([c for c in consent if c[0] in mine])  # type: ignore[misc]


def _run_flower(
    plans: list[SitePlan], config: FederationConfig, strategy: RoundRecorder
) -> list[np.ndarray]:
    """Run the rounds on Flower's simulation engine; the final weights."""
    from flwr.client import ClientApp
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod
    from flwr.common import Context
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

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
        with _closed_ray() as temp_dir:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.sites,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {
                        "num_cpus": 2,
                        "num_gpus": 0,
                        # Flower's type says scalars; it hands init_args to ray.init as is.
                        "resources": dict(_NO_ACCELERATORS),  # type: ignore[dict-item]
                        "include_dashboard": False,
                        "log_to_driver": False,
                        "object_store_memory": 256 * 1024 * 1024,
                        "_temp_dir": str(temp_dir),
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
    weights: list[np.ndarray] = outcome["weights"]
    return weights


@functools.cache
def _ray_token() -> str:
    """One Ray token per process: Ray's driver keeps the first token it reads."""
    return secrets.token_hex(32)


@contextmanager
def _closed_ray() -> Iterator[Path]:
    """Ray's environment for one run; yields its temporary directory, removed afterwards.

    * The directory is private (0700, new for each run): other users cannot read the
      session's address, sockets or logs; nothing is left under ``/tmp/ray``.
    * The cluster refuses a process without the token (``RAY_AUTH_MODE=token``, forced
      when insitu is imported): the token is only in this process's environment and its
      children's, never on a command line or in a file.
    * ``HOME`` is a private directory holding an empty ``ray_bootstrap_config.yaml``:
      without that file Ray's dashboard process (started even without a dashboard, for
      usage statistics) asks the AWS, Azure and GCP metadata servers which cloud it runs
      in, whatever ``RAY_USAGE_STATS_ENABLED`` says.
    * ``FLWR_HOME`` is private too: Flower keeps no id of this machine in ``~/.flwr/source``.
    """
    import ray

    private = Path(tempfile.mkdtemp(prefix="insitu-ray-"))
    home = private / "home"
    env = {
        "RAY_AUTH_TOKEN": _ray_token(),
        "RAY_TMPDIR": str(private / "ray"),
        "HOME": str(home),
        "FLWR_HOME": str(private / "flwr"),
    }
    # Ray's driver writes into the caller's environment (PYTHONPATH with its own
    # thirdparty_files first, PYTHONBREAKPOINT, ...): every process the caller starts
    # after a run would inherit them. The whole environment is put back as it was.
    saved = dict(os.environ)
    try:
        home.mkdir()
        (home / "ray_bootstrap_config.yaml").write_text("{}\n", encoding="utf-8")
        for name in _FOREIGN_RAY_ENV:
            os.environ.pop(name, None)
        os.environ.update(env)
        yield private / "ray"
    finally:
        if ray.is_initialized():  # Flower shuts Ray down, unless it failed on the way
            ray.shutdown()
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)
        _remove_private(private)


def _check_ray_closed() -> None:
    """Refuse a run whose Ray would start without a token (ray imported before insitu)."""
    from ray._raylet import (  # type: ignore[attr-defined]  # ray reads the mode once, here
        AuthenticationMode,
        get_authentication_mode,
    )

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        raise UsageError(
            "ray was imported before insitu, so the simulation's cluster would accept any "
            "local process: import insitu before ray"
        )


def _remove_private(private: Path) -> None:
    """Remove a run's Ray directory; Ray's processes may still be closing their logs."""
    for _ in range(20):
        shutil.rmtree(private, ignore_errors=True)
        if not private.exists():
            return
        time.sleep(0.25)
    logger.warning("could not remove Ray's directory %s of this run: remove it by hand", private)


def _site_summaries(plans: list[SitePlan], run_id: str) -> list[SiteSummary]:
    """Each site's epsilon of this run and its lifetime maximum, from its own ledger."""
    summaries: list[SiteSummary] = []
    for plan in plans:
        ws = Workspace.open(plan.home)
        with ws.ledger() as ledger:
            mine = [
                e.payload
                for e in ledger.entries(event_type="federation.site_round")
                if e.payload.get("run") == run_id
            ]
            spent = SubjectBudget.for_workspace(ws, ledger).spent()
        summaries.append(
            SiteSummary(
                site=plan.site,
                epsilon_run=max((float(p["epsilon_run"]) for p in mine), default=0.0),
                epsilon_spent_max=spent,
                excluded_over_budget=max(
                    (int(p.get("excluded_over_budget", 0)) for p in mine), default=0
                ),
            )
        )
    return summaries


def simulate(
    coordinator: Workspace,
    data: str | os.PathLike[str] | pd.DataFrame,
    config: FederationConfig,
    *,
    schema: DataSchema | ArraySchema | str | os.PathLike[str] | None = None,
    label: str | None = None,
    consent: str | os.PathLike[str] | Sequence[tuple[str, str, str]] | None = None,
    site_epsilon_budget: float | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    model_fn: ModelFn | None = None,
    faults: dict[int, str] | None = None,
    strategy_spy: Callable[[Any], None] | None = None,
) -> FederatedResult:
    """Train across ``config.sites`` simulated sites; see the module docstring.

    Args:
        coordinator: the workspace the run is recorded in (sites live under it).
        data: the whole table: a file's path (CSV, CSV.gz, TSV or Parquet; a ``str`` or
            a path object) or a frame; or array data: an ``.npz`` or a folder of images
            (``insitu.data.ArraySchema``; see ``insitu.federated._arrays``).
        config: the run's settings.
        schema: the data schema (a table's or an array schema), or its TOML file's
            path; without it, one is inferred from ``label``.
        label: the label column when no schema is given.
        consent: the path of a consent CSV (subject,purpose,status) every site imports, or
            the same rows in memory (subject ids are pseudonymized by each site before
            storage).
        site_epsilon_budget: the budget of sites created by this run (existing sites
            keep theirs).
        on_round: called after each round (progress display).
        model_fn: builds the model from the number of input features (any
            ``torch.nn.Module`` with one logit output, or one per class); default:
            ``config.model``. For array data its module receives records of the
            declared shape, scaled to [0, 1]; DP-SGD refuses one Opacus rejects.
        faults: site index -> fault (tests of dropouts and poisoning).
        strategy_spy: receives the strategy before the run (tests).

    Raises:
        DataFormatError: the data file is missing, unreadable or empty.
        SchemaError: the schema file is invalid, or the data does not fit the schema.
        UsageError: bad settings or a data set that cannot be split as asked; or ``ray``
            was imported before insitu (its cluster would run without a token).
        InsufficientDataError: a site too small for the requested epsilon.
        RoundFailedError: a round without enough sites (recorded as ``federation.failed``).
        FederationError: the run could not complete otherwise (also recorded).

    """
    started = time.perf_counter()
    _check_ray_closed()
    # Images or signals are read as the table every later step takes (None: a table).
    schema, model_fn, arrays = array_inputs(data, schema, config, label=label, model_fn=model_fn)
    frame, source = _read_data(data, arrays)
    if schema is not None and not isinstance(schema, DataSchema):
        schema = DataSchema.load(Path(schema))
    if isinstance(consent, str | os.PathLike):
        consent = Path(consent)
    label = _label_for(frame, schema, label, source=source)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    split = _split(
        coordinator, frame, config, label=label, subject=schema.subject if schema else None
    )
    sites = [
        _site_workspace(coordinator, index, site_epsilon_budget)
        for index in range(1, config.sites + 1)
    ]
    warnings: list[str] = arrays.warnings if arrays is not None else []
    if schema is None:
        inferred = _infer_schema(
            coordinator, sites, split, config, label=label, source=source, run_id=run_id
        )
        schema, warnings = inferred.schema, inferred.warnings
    encoder = FeatureEncoder.for_schema(schema, split.pool)
    central = prepare(
        split.central, schema, Pseudonymizer(coordinator.secret("pseudonym")), source="central", k=1
    ).frame
    central_x, central_y = encoder.encode(central), encoder.labels(central)
    (select_x, select_y), (central_x, central_y) = _halves(central_x, central_y)
    n_features = len(encoder.names)
    plans = _make_sites(
        sites,
        split,
        schema,
        config,
        run_id=run_id,
        n_features=n_features,
        source=source,
        consent=consent,
        model_fn=model_fn,
        faults=faults or {},
    )

    plain_model, new_model, centring = _model_builders(config, model_fn, n_features)
    keeper = RoundKeeper(rows=len(select_y))

    torch.manual_seed(config.seed)  # the initial model is public: every site receives it
    strategy = _strategy(
        coordinator,
        config,
        plans,
        run_id=run_id,
        new_model=new_model,
        central_x=central_x,
        central_y=central_y,
        on_round=on_round,
        keep=lambda r, w: keeper.observe(r, w, _accuracy(new_model(), w, select_x, select_y)),
    )
    _record_started(coordinator, run_id, schema, plans, config)
    if strategy_spy is not None:
        strategy_spy(strategy)
    try:
        weights = _run_flower(plans, config, strategy)
    except FederationError as exc:
        with coordinator.ledger() as ledger:
            record_failed(ledger, run_id=run_id, error=exc)
        raise
    rounds = [strategy.records[r] for r in sorted(strategy.records)]
    weights = _kept_weights(keeper, weights, centring=centring)
    model = _loaded(plain_model(), weights)
    _, central_accuracy = evaluate(model, central_x, central_y)
    baseline = _baseline(
        coordinator, run_id, split, schema, encoder, (central_x, central_y), central_accuracy
    )
    model_dir = _save_model(
        coordinator,
        run_id=run_id,
        model=model,
        encoder=encoder,
        schema=schema,
        sample=central_x,
        arrays=arrays,
    )
    result = FederatedResult(
        run_id=run_id,
        config=config,
        rounds=rounds,
        weights=weights,
        model_dir=model_dir,
        site_homes=[p.home for p in plans],
        central_accuracy=central_accuracy,
        seconds=time.perf_counter() - started,
        sites=_site_summaries(plans, run_id),
        warnings=warnings,
        baseline_accuracy=baseline,
        kept_round=keeper.round or config.rounds,
        kept_because=keeper.reason(config.rounds),
    )
    atomic_write_text(model_dir / "record.json", json.dumps(result.to_json(), indent=2) + "\n")
    final = strategy.records.get(config.rounds)
    with coordinator.ledger() as ledger:
        record_groups(
            ledger,
            run_id=run_id,
            round_number=config.rounds,
            schema=schema,
            config=config,
            sums=final.groups if final else None,
            sites_evaluated=final.evaluated if final else (),
        )
        record_completed(
            ledger,
            run_id=run_id,
            rounds=len(rounds),
            central_accuracy=central_accuracy,
            weights=weights,
            onnx=(model_dir / "model.onnx").read_bytes(),
            epsilon_run=result.epsilon_run if config.privacy != "none" else None,
            delta=config.delta if config.privacy != "none" else None,
            kept_round=result.kept_round,
            kept_because=result.kept_because,
        )
    return result


def _model_builders(
    config: FederationConfig, model_fn: ModelFn | None, n_features: int
) -> tuple[Callable[[], torch.nn.Module], Callable[[], torch.nn.Module], bool]:
    """The model as saved, the model as sites train it, and whether they differ by centring."""

    def plain_model() -> torch.nn.Module:
        if model_fn is not None:
            return model_fn(n_features)
        return build_model(config.model, n_features, hidden=config.hidden)

    centring = model_fn is None and uses_centering(config, plain_model())

    def new_model() -> torch.nn.Module:
        return centered(plain_model()) if centring else plain_model()

    return plain_model, new_model, centring


def _kept_weights(
    keeper: RoundKeeper, last: list[np.ndarray], *, centring: bool
) -> list[np.ndarray]:
    """The kept round's weights (the last round's if none was kept), as the saved model's."""
    weights = keeper.weights if keeper.weights is not None else last
    return fold_centering(weights) if centring else weights


def _halves(
    x: np.ndarray, y: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The central rows in two: one half chooses the round to keep, the other measures it."""
    choose = np.arange(len(y)) % 2 == 1
    return (x[choose], y[choose]), (x[~choose], y[~choose])


def _accuracy(
    model: torch.nn.Module, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray
) -> float:
    return evaluate(_loaded(model, weights), x, y)[1] if len(y) else 0.0


def _loaded(model: torch.nn.Module, weights: list[np.ndarray]) -> torch.nn.Module:
    set_weights(model, weights)
    return model


def _baseline(  # noqa: PLR0917 -- one call site, in order
    coordinator: Workspace,
    run_id: str,
    split: _Split,
    schema: DataSchema,
    encoder: FeatureEncoder,
    test: tuple[np.ndarray, np.ndarray],
    private_accuracy: float,
) -> float | None:
    """A non-private central logistic regression on every site's records.

    Recorded as ``federation.baseline`` (simulation only: the coordinator holds the file).
    """
    test_x, test_y = test
    if len(np.unique(test_y)) > 2 or len(encoder.names) == 0:
        return None
    pool = prepare(
        split.pool, schema, Pseudonymizer(coordinator.secret("pseudonym")), source="pool", k=1
    ).frame
    train_x, train_y = encoder.encode(pool), encoder.labels(pool)
    if len(np.unique(train_y)) > 2:
        return None
    accuracy = central_baseline(train_x, train_y, test_x, test_y)
    with coordinator.ledger() as ledger:
        events.FEDERATION_BASELINE.record(
            ledger,
            run=run_id,
            method="centralized logistic regression (L-BFGS, L2 1e-4), no DP, on the pooled "
            "records of every site",
            baseline_accuracy=round(accuracy, 4),
            private_accuracy=round(private_accuracy, 4),
            train_rows=len(train_y),
            test_rows=len(test_y),
        )
    return accuracy


def _read_data(
    data: str | os.PathLike[str] | pd.DataFrame, arrays: ArrayRun | None = None
) -> tuple[pd.DataFrame, str]:
    """The table, and the source name its sites record (the file's name, or ``data``)."""
    if arrays is not None:
        return arrays.table.frame, arrays.table.source
    if isinstance(data, pd.DataFrame):
        return data, "data"
    path = Path(data)
    return read_table(path), path.name


def _label_for(
    frame: pd.DataFrame, schema: DataSchema | None, label: str | None, *, source: str
) -> str:
    """The label column, checked against the data and the schema."""
    if schema is None:
        if label is None:
            raise UsageError("give a data schema (--schema) or the label column (--label)")
        if label not in frame.columns:
            raise SchemaError(
                f"label column {label!r} is not in the data {source} (its columns: "
                f"{', '.join(map(str, frame.columns))})"
            )
        return label
    if label is not None and label != schema.label:
        raise UsageError(f"--label {label!r} differs from the schema's label {schema.label!r}")
    schema.check_columns(frame.columns, source=source)
    return schema.label


def _infer_schema(
    coordinator: Workspace,
    sites: list[Workspace],
    split: _Split,
    config: FederationConfig,
    *,
    label: str,
    source: str,
    run_id: str,
) -> InferredSchema:
    """A schema inferred under DP from the rows of the run, charged to their subjects first.

    Each site charges the inference's event to the subjects of its part (those without
    budget left are left out of the inference); the coordinator's central rows are its
    own (simulation only). Identifier-looking columns are dropped, one warning each.
    """
    sigma = calibrate_noise(
        target_epsilon=config.inference_epsilon,
        delta=config.delta / 2,
        sample_rate=1.0,
        steps=1,
    )
    event = PrivacyEvent(sigma, 1.0, 1)
    used = [split.central]
    for ws, rows in zip(sites, split.parts, strict=True):
        part = split.pool.iloc[rows].reset_index(drop=True)
        keys = subject_keys(
            subject_tokens(part, Pseudonymizer(ws.secret("pseudonym")), subject=None)
        )
        with ws.ledger() as ledger:
            charge = SubjectBudget.for_workspace(ws, ledger).charge(
                keys, event, mechanism="schema-inference", run=run_id
            )
        used.append(part[charge.admission.admitted])
    inferred = infer_schema(
        pd.concat(used, ignore_index=True),
        label=label,
        name=source.split(".", maxsplit=1)[0] or "dataset",
        epsilon=config.inference_epsilon,
        delta=config.delta,
    )
    if inferred.event is not None and inferred.event != event:  # pragma: no cover - same math
        raise FederationError("the inference's privacy event is not the one the sites paid for")
    with coordinator.ledger() as ledger:
        events.SCHEMA_INFERRED.record(
            ledger,
            run=run_id,
            dataset=inferred.schema.name,
            schema_sha256=inferred.schema.digest(),
            dropped=inferred.dropped,
            epsilon=config.inference_epsilon,
            delta=config.delta,
            noise_multiplier=sigma,
        )
    return inferred  # its warnings were logged where they were found (infer_schema)


def _strategy(
    coordinator: Workspace,
    config: FederationConfig,
    plans: list[SitePlan],
    *,
    run_id: str,
    new_model: Callable[[], torch.nn.Module],
    central_x: np.ndarray,
    central_y: np.ndarray,
    on_round: Callable[[RoundRecord], None] | None,
    keep: Callable[[int, list[np.ndarray]], None] | None = None,
) -> RoundRecorder:
    from flwr.common import ndarrays_to_parameters

    initial = ndarrays_to_parameters(get_weights(new_model()))

    def central_eval(
        server_round: int, weights: list[np.ndarray], _: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        model = new_model()
        set_weights(model, weights)
        loss, accuracy = evaluate(model, central_x, central_y)
        if keep is not None and server_round > 0:
            keep(server_round, weights)
        return loss, {"accuracy": accuracy}

    def record_round(record: RoundRecord) -> None:
        with coordinator.ledger() as ledger:
            events.FEDERATION_ROUND.record(ledger, run=run_id, **_round_payload(record))
        if on_round is not None:
            on_round(record)

    return RoundRecorder(
        build_strategy(
            config,
            initial,
            evaluate_fn=central_eval,
            site_noise_multiplier=plans[0].site_noise_multiplier,
        ),
        config=config,
        on_round=record_round,
        site_names=[p.site for p in plans],
    )


def _round_payload(record: RoundRecord) -> dict[str, Any]:
    """``federation.round``: who took part and was lost, what the figures cover, epsilon."""
    return record.ledger_payload()


def _record_started(
    coordinator: Workspace,
    run_id: str,
    schema: DataSchema,
    plans: list[SitePlan],
    config: FederationConfig,
) -> None:
    with coordinator.ledger() as ledger:
        events.FEDERATION_STARTED.record(
            ledger,
            run=run_id,
            dataset=schema.name,
            schema_sha256=schema.digest(),
            site_names=[p.site for p in plans],
            reproducible=config.privacy == "none",
            defaults=config.rules(),
            **{k: v for k, v in config.to_json().items() if k != "secagg_clipping_range"},
        )


def _save_model(
    coordinator: Workspace,
    *,
    run_id: str,
    model: torch.nn.Module,
    encoder: FeatureEncoder,
    schema: DataSchema,
    sample: np.ndarray,
    arrays: ArrayRun | None = None,
) -> Path:
    """Write the PyTorch state, the ONNX export (parity-checked) and the feature names."""
    if arrays is not None:  # the graph takes raw records of the declared shape
        return save_array_model(coordinator, run_id=run_id, model=model, run=arrays, sample=sample)
    model_dir = coordinator.model_dir(run_id)
    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    onnx_bytes = export_onnx(model, len(encoder.names))
    parity = onnx_parity(model, onnx_bytes, sample[:256])
    atomic_write_bytes(model_dir / "model.pt", buffer.getvalue())
    atomic_write_bytes(model_dir / "model.onnx", onnx_bytes)
    atomic_write_text(
        model_dir / "features.json",
        json.dumps(
            {
                "features": encoder.names,
                "schema": schema.source,
                "schema_sha256": schema.digest(),
                "onnx_parity_max_abs_diff": parity.max_abs_diff,
                "onnx_parity_relative": parity.relative,
            },
            indent=2,
        )
        + "\n",
    )
    return model_dir
