"""The bodies of the deployed Flower apps: what runs in ``flwr-serverapp`` and ``flwr-clientapp``.

:func:`run_server_app` is the legacy-path ServerApp of simulation (ADR 0008):
``build_strategy`` inside ``RoundRecorder``, SecAgg+ through ``SecAggPlusWorkflow``; it
records ``federation.started`` / ``federation.round`` / ``federation.completed`` (or
``federation.failed``) in the server's workspace and saves the model as simulation does,
with the sites' counts per group of persons (``evaluation.groups``, when the schema
declares sensitive attributes: ``insitu.federated._groups``).
After every round it keeps ``checkpoint.npz`` in the run directory (and records
``federation.checkpointed``); a run that stops keeps its last good round there, and a
plan with ``resume`` (``RunPlan.resumed``) goes on from it (``federation.resumed``).
:func:`site_client` is :class:`~insitu.federated.SiteClient`: the site enforces its own
per-subject budget in its own ledger exactly as in simulation, and refuses a run whose
schema digest differs from the one its data was prepared under, or whose records (array
data: ``SharedPlan.array_input``) have another shape than its own, leaving the reason for
``insitu federate site`` (:func:`~._plan.refusals_dir`). A run on array data trains the
model the plan's input declares (the CNN of its shape) on both sides.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid

from insitu._atomic import atomic_write_text
from insitu.audit import events
from insitu.data import DataSchema
from insitu.errors import (
    FederationError,
)
from insitu.federated._checkpoint import CHECKPOINT_NAME, Checkpoint
from insitu.federated._defaults import fold_centering, uses_centering
from insitu.federated._groups import record_groups
from insitu.federated._plan import RunPlan, SharedPlan, SiteSetup, refusals_dir
from insitu.federated._processes import (
    RUN_DIR_ENV,
)
from insitu.federated._server_app import (
    RoundRecord,
    RoundRecorder,
    build_strategy,
    record_checkpointed,
    record_completed,
    record_failed,
    record_resumed,
    record_round,
    run_rounds,
)
from insitu.federated._site_app import SiteClient, SitePlan
from insitu.training import (
    ArrayModelFn,
    ModelFn,
    build_model,
    get_weights,
    onnx_parity,
    set_weights,
    weights_digest,
)
from insitu.workspace import Workspace

__all__ = ["run_server_app", "site_client"]

logger = logging.getLogger(__name__)


def run_server_app(grid: Grid, context: Context) -> None:
    """The ServerApp of a deployed run (in ``flwr-serverapp``; see ``insitu._flower_app``).

    The server's own plan (its workspace, paths) comes from the run directory named in
    ``INSITU_RUN_DIR``, which :func:`serve` sets on the SuperLink it starts; the run
    config, which every site also receives, carries only what sites need.
    """
    run_dir = Path(os.environ[RUN_DIR_ENV])
    plan = RunPlan.read(run_dir)
    try:
        if SharedPlan.loads(str(context.run_config["insitu"])).run_id != plan.run_id:
            raise FederationError("the run submitted is not the run this server planned")
        _run_server(grid, context, plan)
    except BaseException as exc:
        kept = _checkpoint_round(plan.run_dir / CHECKPOINT_NAME)
        if isinstance(exc, FederationError):
            with Workspace.open(plan.home).ledger() as ledger:
                record_failed(ledger, run_id=plan.run_id, error=exc, checkpoint_round=kept)
        result: dict[str, Any] = {"error": str(exc)}
        if kept is not None:
            result |= {"checkpoint": str(plan.run_dir / CHECKPOINT_NAME), "checkpoint_round": kept}
        atomic_write_text(run_dir / "result.json", json.dumps(result) + "\n")
        raise


def _checkpoint_round(path: Path) -> int | None:
    """The round a run's checkpoint holds, if it has a readable one."""
    if not path.exists():
        return None
    try:
        return Checkpoint.read(path).round
    except FederationError:
        return None


def _resume(ws: Workspace, plan: RunPlan) -> Checkpoint | None:
    """The checkpoint a resumed plan names, checked; ``federation.resumed`` recorded.

    The file must have the SHA-256 the plan names, be this run's under the same settings,
    and, when the ledger recorded it (``federation.checkpointed``), be the one recorded.

    Raises:
        FederationError: any of these does not hold (one line naming the file).

    """
    if plan.resume is None:
        return None
    point = plan.resume
    checkpoint = Checkpoint.read(point.checkpoint, sha256=point.checkpoint_sha256)
    if (
        checkpoint.run_id != plan.run_id
        or checkpoint.round != point.from_round
        or checkpoint.config != plan.config.to_json()
    ):
        raise FederationError(
            f"the checkpoint {point.checkpoint} is not round {point.from_round} of run "
            f"{plan.run_id} under its settings; refusing to resume from it"
        )
    with ws.ledger() as ledger:
        recorded = [
            e.payload["checkpoint_sha256"]
            for e in ledger.entries(event_type="federation.checkpointed")
            if e.payload.get("run") == plan.run_id and e.payload.get("round") == point.from_round
        ]
        if recorded and recorded[-1] != point.checkpoint_sha256:
            raise FederationError(
                f"the checkpoint {point.checkpoint} is not the one the ledger recorded for "
                f"round {point.from_round} of run {plan.run_id}; refusing to resume from it"
            )
        record_resumed(ledger, checkpoint=checkpoint, sha256=point.checkpoint_sha256)
    (plan.run_dir / "result.json").unlink(missing_ok=True)  # the stopped attempt's error
    return checkpoint


def _node_names(ws: Workspace, run_id: str) -> dict[str, str]:
    """Flower node id -> site name, from the run's last ``federation.sites_registered``."""
    with ws.ledger() as ledger:
        entries = [
            e.payload
            for e in ledger.entries(event_type="federation.sites_registered")
            if e.payload.get("run") == run_id
        ]
    ids = entries[-1].get("node_ids", {}) if entries else {}
    return {str(node): str(site) for site, node in ids.items()}


def _run_server(grid: Grid, context: Context, plan: RunPlan) -> None:
    config, ws = plan.config, Workspace.open(plan.home)
    run_id, run_dir = plan.run_id, plan.run_dir
    n_features = plan.shared.n_features
    torch.manual_seed(config.seed)
    model_fn = _array_model_fn(plan.shared)
    model = (
        model_fn(n_features)
        if model_fn is not None
        else build_model(config.model, n_features, hidden=config.hidden)
    )
    resumed = _resume(ws, plan)
    if resumed is None:
        with ws.ledger() as ledger:
            events.FEDERATION_STARTED.record(
                ledger,
                run=run_id,
                dataset=plan.shared.dataset,
                schema_sha256=plan.shared.schema_sha256,
                site_names=list(plan.sites_registered),
                engine="deployment",
                defaults=config.rules(),
                **{k: v for k, v in config.to_json().items() if k != "secagg_clipping_range"},
            )
    initial = ndarrays_to_parameters(get_weights(model) if resumed is None else resumed.weights)
    rounds: list[dict[str, Any]] = [] if resumed is None else list(resumed.history)

    def on_round(record: RoundRecord) -> None:
        with ws.ledger() as ledger:
            record_round(ledger, run_id=run_id, record=record)
        rounds.append(record.to_json() | {"seen_by_strategy": record.seen_by_strategy})
        atomic_write_text(
            run_dir / "progress.txt",
            f"round {record.round}/{config.rounds}: {record.summary(config.sites)}\n",
        )

    def on_checkpoint(checkpoint: Checkpoint, sha256: str) -> None:
        with ws.ledger() as ledger:
            record_checkpointed(ledger, checkpoint=checkpoint, sha256=sha256)

    strategy = RoundRecorder(
        build_strategy(
            config,
            initial,
            evaluate_fn=None,
            site_noise_multiplier=plan.shared.site_noise_multiplier,
        ),
        config=config,
        on_round=on_round,
        run_id=run_id,
        checkpoint_dir=run_dir,
        on_checkpoint=on_checkpoint,
        resume_from=resumed,
        node_names=_node_names(ws, run_id),
    )
    weights = run_rounds(grid, context, config, strategy)
    if uses_centering(config, model):  # sites trained on centred inputs: fold it in
        weights = fold_centering(weights)
    set_weights(model, weights)
    model_dir = _save_deployed_model(ws, run_id=run_id, model=model, plan=plan)
    digest = weights_digest(weights)
    epsilon_run = max(
        (max(r["epsilon_by_site"].values(), default=0.0) for r in rounds), default=0.0
    )
    final = strategy.records.get(config.rounds)
    with ws.ledger() as ledger:
        record_groups(
            ledger,
            run_id=run_id,
            round_number=config.rounds,
            schema=DataSchema.from_dict(plan.schema_source),
            config=config,
            sums=final.groups if final else None,
            sites_evaluated=final.evaluated if final else (),
        )
        record_completed(
            ledger,
            run_id=run_id,
            rounds=len(rounds),
            central_accuracy=None,
            weights=weights,
            onnx=(model_dir / "model.onnx").read_bytes(),
            epsilon_run=epsilon_run if config.privacy != "none" else None,
            delta=config.delta if config.privacy != "none" else None,
        )
    result = {"rounds": rounds, "model_dir": str(model_dir), "model_sha256": digest}
    atomic_write_text(
        model_dir / "record.json", json.dumps(result | plan.to_json(), indent=2) + "\n"
    )
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")


#: How a deployed model's ONNX parity is probed (recorded in ``features.json``).
_PROBE = "uniform [0, 1], 256 rows (the server holds no records)"


def _save_deployed_model(
    ws: Workspace, *, run_id: str, model: torch.nn.Module, plan: RunPlan
) -> Path:
    """Model files as simulation writes them; the ONNX parity probe is synthetic here.

    The server holds no records, so the parity of the ONNX export with PyTorch is
    checked on 256 rows drawn uniformly from [0, 1] (the range of encoded features).
    """
    import io

    from insitu._atomic import atomic_write_bytes
    from insitu.training import export_onnx

    model_dir = ws.model_dir(run_id)
    probe = np.random.default_rng(0).random((256, plan.shared.n_features), dtype=np.float32)
    if plan.array_schema_source is not None:  # the graph takes raw records, as simulated
        from insitu.data import ArraySchema
        from insitu.federated._arrays import write_array_model

        return write_array_model(
            model_dir,
            model,
            arrays=ArraySchema.from_dict(plan.array_schema_source),
            schema=DataSchema.from_dict(plan.schema_source),
            sample=probe,
            onnx_parity_probe=_PROBE,
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    onnx_bytes = export_onnx(model, plan.shared.n_features)
    parity = onnx_parity(model, onnx_bytes, probe)
    atomic_write_bytes(model_dir / "model.pt", buffer.getvalue())
    atomic_write_bytes(model_dir / "model.onnx", onnx_bytes)
    atomic_write_text(
        model_dir / "features.json",
        json.dumps(
            {
                "features": list(plan.feature_names),
                "schema": plan.schema_source,
                "schema_sha256": plan.shared.schema_sha256,
                "onnx_parity_max_abs_diff": parity.max_abs_diff,
                "onnx_parity_relative": parity.relative,
                "onnx_parity_probe": _PROBE,
            },
            indent=2,
        )
        + "\n",
    )
    return model_dir


# --------------------------------------------------------------------------- site side


class _DeployedSite(SiteClient):
    """A :class:`SiteClient` that marks the end of a run for ``insitu federate site --once``."""

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Evaluate as a site does; after the last round, mark the run done."""
        result = super().evaluate(parameters, config)
        if int(config.get("round", 0)) >= self.plan.config.rounds:
            done = Workspace.layout(self.plan.home).runs_done_dir
            done.mkdir(parents=True, exist_ok=True)
            atomic_write_text(done / self.plan.run_id, "done\n")
        return result


def _check_input(site: SiteSetup, run: SharedPlan) -> None:
    """Refuse a run whose records are not those this site prepared (shape, or table)."""
    ours, theirs = site.array_input, run.array_input
    if ours is None and theirs is None:
        return
    if ours is None or theirs is None:
        has = "a table" if ours is None else f"records of shape {ours.describe()}"
        wants = "a table" if theirs is None else f"records of shape {theirs.describe()}"
        raise FederationError(
            f"{site.site}: run {run.run_id} trains on {wants}, this site prepared {has}; "
            "join with the data and schema the federation uses"
        )
    if (ours.kind, ours.shape) != (theirs.kind, theirs.shape):
        raise FederationError(
            f"{site.site}: run {run.run_id} takes records of shape {theirs.describe()}, this "
            f"site prepared records of shape {ours.describe()}; refusing: prepare the data "
            "under the federation's array schema (arrays.shape), reshaping it if need be"
        )


def _site_plan(context: Context) -> SitePlan:
    home = Path(str(context.node_config["insitu-home"]))
    run = SharedPlan.loads(str(context.run_config["insitu"]))
    site = SiteSetup.read(home)
    try:
        _check_input(site, run)
        if site.schema_sha256 != run.schema_sha256:
            raise FederationError(
                f"{site.site}: the run's schema ({run.schema_sha256[:12]}) is not the one "
                f"this site prepared its data under ({site.schema_sha256[:12]}); refusing"
            )
    except FederationError as exc:
        _record_refusal(home, run.run_id, str(exc))
        raise
    return SitePlan(
        run_id=run.run_id,
        site=site.site,
        home=home,
        train_dir=site.train_dir,
        test_dir=site.test_dir,
        dataset=site.dataset,
        n_features=run.n_features,
        config=run.config,
        site_noise_multiplier=run.site_noise_multiplier,
        model_fn=_array_model_fn(run),
    )


def _record_refusal(home: Path, run_id: str, reason: str) -> None:
    """Leave the refusal for ``insitu federate site`` (:func:`~._plan.refusals_dir`)."""
    directory = refusals_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / run_id
    if not path.exists():
        atomic_write_text(path, reason + "\n")


def _array_model_fn(run: SharedPlan) -> ModelFn | None:
    """The CNN a run on array data trains (``None``: the tabular families)."""
    if run.array_input is None or run.config.model != "cnn":
        return None
    return ArrayModelFn(run.array_input.shape, len(run.array_input.classes))


def site_client(context: Context) -> Any:
    """The site's Flower client for one message (in ``flwr-clientapp``)."""
    return _DeployedSite(_site_plan(context)).to_client()
