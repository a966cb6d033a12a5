"""On-device fine-tuning: the last layers, DP-SGD, the site's budget, installed only if better.

``finetune`` at a site, in order (each step refuses rather than guesses):

1. the installed version is loaded from the A/B slots and verified (signature, digest);
2. the local file is read under the data schema the model card carries (columns
   checked, identifiers pseudonymized, records without consent left out);
3. the records are split, stratified by label, into a training part and a held-out
   part; an empty or one-class part is refused (:class:`UnusableSplitError`);
4. the ONNX model is rebuilt as a PyTorch module (``_rebuild``, checked equal to ONNX
   Runtime's outputs) and all but its last ``layers`` linear layers are frozen;
5. the DP-SGD event (Opacus with secret noise, as in federated training:
   ``insitu.training.train``) is calibrated for ``epsilon`` and *charged to the
   subjects of the training records before training*, the same per-subject budget
   federated rounds spend: subjects it no longer fits are left out, and when none
   remain :class:`BudgetExceededError` is raised and recorded
   (``privacy.budget_refused``);
6. the fine-tuned model is exported to ONNX and both it and the installed version are
   scored by ONNX Runtime on the held-out part; only a *strictly* better one is bundled
   (signed by this device, encrypted to it), installed into the inactive slot and made
   active, as a local version ``X.Y.(Z+1)-local.N`` that sorts after its base and before
   the federation's next release. ``finetune.installed`` or ``finetune.rejected`` records
   the figures; the weights of an installed version are kept so that the site can offer
   them as the next federated round's starting point (:func:`local_start_weights`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu._atomic import atomic_write_bytes
from insitu.audit import events
from insitu.bundle import ModelCard, SemVer
from insitu.data import DataSchema, SiteDataset, read_table
from insitu.errors import InstallError, SchemaError, UnusableSplitError, UsageError
from insitu.workspace import Workspace

if TYPE_CHECKING:
    from torch import nn

    from insitu.privacy import BudgetCharge, PrivacyEvent
    from insitu.update import UpdateClient

__all__ = ["FinetuneResult", "finetune", "local_start_weights", "split_holdout"]

logger = logging.getLogger(__name__)

INSTALLED = events.FINETUNE_INSTALLED.name
REJECTED = events.FINETUNE_REJECTED.name


@dataclass(frozen=True)
class FinetuneResult:
    """What one fine-tuning did."""

    model: str
    base_version: str
    version: str | None
    installed: bool
    accuracy_installed: float
    accuracy_finetuned: float
    rows_train: int
    rows_holdout: int
    epsilon: float
    epsilon_spent_total: float
    epsilon_budget: float
    noise_multiplier: float
    weights: str | None

    def to_json(self) -> dict[str, Any]:
        """As printed by ``insitu finetune --json``."""
        return dict(self.__dict__)


def split_holdout(
    labels: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): ``fraction`` of each class held out, at random.

    Raises:
        UnusableSplitError: a part is empty or holds a single class.

    """
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise UsageError(f"--holdout must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        cut = round(len(rows) * fraction)
        held.append(rows[:cut])
        train.append(rows[cut:])
    train_idx = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    for name, index in (("training", train_idx), ("held-out", held_idx)):
        if len(index) == 0:
            raise UnusableSplitError(
                f"the local {name} split is empty ({len(labels)} usable records); fine-tuning "
                "needs labelled records with consent in the data file"
            )
        classes = np.unique(labels[index])
        if len(classes) < 2:
            raise UnusableSplitError(
                f"the local {name} split holds a single class ({classes[0]}) in "
                f"{len(index)} records; fine-tuning needs labelled records of every class"
            )
    return train_idx, held_idx


def _accuracy(model: bytes, features: np.ndarray, labels: np.ndarray) -> float:
    from insitu._ort import create_session

    session = create_session(model, intra_op_threads=1)
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: np.ascontiguousarray(features, dtype=np.float32)})[0]
    if logits.ndim == 1 or logits.shape[-1] == 1:
        predicted = (logits.reshape(-1) > 0).astype(np.int64)
    else:
        predicted = logits.argmax(axis=-1)
    return float(np.mean(predicted == labels))


def _schema_of(card: ModelCard, schema_path: Path | None) -> DataSchema:
    if card.drift_reference and card.drift_reference.get("schema"):
        # Signed with the card: the schema the model was trained with.
        return DataSchema.from_dict(card.drift_reference["schema"])
    if schema_path is None:
        raise SchemaError(
            f"the model card of {card.name} {card.version} carries no data schema; pass the "
            "schema it was trained with (--schema FILE)"
        )
    schema = DataSchema.load(schema_path)
    expected = card.provenance.get("data_schema_sha256")
    # 'insitu bundle create --data-schema' records the file's SHA-256, the Python API
    # the canonical digest: either names this schema.
    file_digest = hashlib.sha256(schema_path.read_bytes()).hexdigest()
    if expected and expected not in {schema.digest(), file_digest}:
        raise SchemaError(
            f"the schema is not the one {card.name} {card.version} was trained with (its "
            "digest differs from the card's data_schema_sha256); use that schema"
        )
    return schema


def _next_version(base: str, workspace: Workspace, model: str) -> str:
    parsed = SemVer.parse(base)
    release = (
        (parsed.major, parsed.minor, parsed.patch)
        if parsed.prerelease[:1] == ("local",)
        else (parsed.major, parsed.minor, parsed.patch + 1)
    )
    stem = ".".join(str(x) for x in release)
    with workspace.ledger() as ledger:
        earlier = [
            e
            for e in ledger.entries(event_type=INSTALLED)
            if e.payload.get("model") == model
            and str(e.payload.get("version", "")).startswith(f"{stem}-local.")
        ]
    return f"{stem}-local.{len(earlier) + 1}"


def finetune(
    workspace: Workspace,
    model: str,
    data: Path,
    *,
    epsilon: float = 1.0,
    epochs: int = 3,
    batch_size: int = 64,
    learning_rate: float = 0.5,
    max_grad_norm: float = 1.0,
    holdout: float = 0.3,
    layers: int = 1,
    seed: int = 0,
    schema_path: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the installed ``model`` on ``data``; see the module docstring.

    Raises:
        InstallError: ``model`` is not the model installed on this device.
        SchemaError: ``data``'s columns do not match the card's schema.
        UnusableSplitError: an empty or one-class training or held-out split.
        BudgetExceededError: the fine-tuning would exceed the site's budget.

    """
    from insitu.training import export_onnx

    stage = on_stage or (lambda _: None)
    if epsilon <= 0 or epochs < 1 or batch_size < 1 or layers < 1 or learning_rate <= 0:
        raise UsageError("epsilon, learning rate, epochs, batch size and layers must be positive")
    stage("loading the installed model")
    client, card, installed_model = _load_installed(workspace, model)
    schema = _schema_of(card, schema_path)

    stage("reading the local data")
    local = _read_local(workspace, data, schema, card, holdout=holdout, seed=seed)
    torch_model = _trainable(installed_model, local.x_held, layers=layers)
    accuracy_before = _accuracy(installed_model, local.x_held, local.y_held)

    stage("charging the privacy budget")
    charged = _charge(
        workspace,
        local,
        model=model,
        card=card,
        schema=schema,
        epsilon=epsilon,
        epochs=epochs,
        batch_size=batch_size,
    )
    rows = _train(
        torch_model,
        local,
        charged,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        stage=stage,
    )
    stage("evaluating on the held-out split")
    candidate = export_onnx(torch_model, local.width)
    outcome = FinetuneResult(
        model=model,
        base_version=card.version,
        version=None,
        installed=False,
        accuracy_installed=accuracy_before,
        accuracy_finetuned=_accuracy(candidate, local.x_held, local.y_held),
        rows_train=rows,
        rows_holdout=len(local.y_held),
        epsilon=epsilon,
        epsilon_spent_total=charged.charge.epsilon_max_after,
        epsilon_budget=charged.charge.budget,
        noise_multiplier=charged.noise_multiplier,
        weights=None,
    )
    figures = _figures(outcome, charged, layers=layers)
    if not outcome.accuracy_finetuned > outcome.accuracy_installed:
        with workspace.ledger() as ledger:
            events.FINETUNE_REJECTED.record(
                ledger, **figures, reason="not better on the local held-out split"
            )
        return outcome

    stage("bundling and installing")
    version, weights_path = _install(
        workspace,
        client,
        outcome,
        torch_model,
        candidate,
        card=card,
        schema=schema,
        charged=charged,
        figures=figures,
        layers=layers,
    )
    return dataclasses.replace(outcome, version=version, installed=True, weights=str(weights_path))


@dataclass(frozen=True)
class _Local:
    """The local records, encoded and split (steps 2 and 3)."""

    width: int  # the encoded columns
    x_train: np.ndarray
    y_train: np.ndarray
    subjects: np.ndarray  # the subject keys of the training records
    x_held: np.ndarray
    y_held: np.ndarray


@dataclass(frozen=True)
class _Charged:
    """The DP-SGD event, charged to the training records' subjects (step 5)."""

    event: PrivacyEvent
    noise_multiplier: float
    delta: float
    charge: BudgetCharge


def _load_installed(workspace: Workspace, model: str) -> tuple[UpdateClient, ModelCard, bytes]:
    """The update client, and the card and ONNX model of the installed version (step 1)."""
    from insitu.update import UpdateClient

    client = UpdateClient(
        workspace.update_dir,
        device_key=workspace.encryption_key(),
        local_publisher=workspace.signing_public_key,
    )
    if client.config.model != model:
        raise InstallError(
            f"this device runs {client.config.model!r}, not {model!r}; fine-tune the "
            "installed model"
        )
    if client.slots.active() is None:
        raise InstallError(f"no version of {model} is installed; run 'insitu update' first")
    opened = client.load()
    return client, opened.card, bytes(opened.model)


def _read_local(
    workspace: Workspace,
    data: Path,
    schema: DataSchema,
    card: ModelCard,
    *,
    holdout: float,
    seed: int,
) -> _Local:
    """The records of ``data`` under ``schema``, as wide as the model takes, split."""
    frame = read_table(data)
    schema.check_columns(frame.columns, source=str(data))
    records = SiteDataset.from_frame(workspace, frame, schema, source=str(data), k=1)
    local = records.for_round(role="training")
    width = card.inputs[0]["shape"][-1] if card.inputs and card.inputs[0]["shape"] else None
    if isinstance(width, int) and local.features.shape[1] != width:
        raise SchemaError(
            f"{data} encodes to {local.features.shape[1]} columns, the model takes {width}; "
            "use the schema the model was trained with"
        )
    train_idx, held_idx = split_holdout(local.labels, fraction=holdout, seed=seed)
    return _Local(
        width=local.features.shape[1],
        x_train=local.features[train_idx],
        y_train=local.labels[train_idx],
        subjects=local.subject_keys[train_idx],
        x_held=local.features[held_idx],
        y_held=local.labels[held_idx],
    )


def _trainable(installed_model: bytes, check_inputs: np.ndarray, *, layers: int) -> nn.Sequential:
    """The installed model in PyTorch, all but its last ``layers`` linear layers frozen."""
    from insitu.finetune._rebuild import rebuild_sequential

    torch_model = rebuild_sequential(installed_model, check_inputs)
    linears = [m for m in torch_model if hasattr(m, "weight")]
    for module in linears[: max(0, len(linears) - layers)]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return torch_model


def _charge(
    workspace: Workspace,
    local: _Local,
    *,
    model: str,
    card: ModelCard,
    schema: DataSchema,
    epsilon: float,
    epochs: int,
    batch_size: int,
) -> _Charged:
    """DP-SGD calibrated for ``epsilon``, charged before training to the subjects it fits.

    Raises:
        BudgetExceededError: it fits no subject's budget (recorded).

    """
    from insitu.privacy import SubjectBudget, calibrate_noise
    from insitu.training import planned_event

    rows = len(local.y_train)
    one = planned_event(rows=rows, batch_size=batch_size, epochs=epochs, noise_multiplier=1.0)
    delta = float(workspace.config.get("privacy", "delta"))
    sigma = calibrate_noise(
        target_epsilon=epsilon, delta=delta, sample_rate=one.sample_rate, steps=one.steps
    )
    event = planned_event(rows=rows, batch_size=batch_size, epochs=epochs, noise_multiplier=sigma)
    with workspace.ledger() as ledger:
        charge = SubjectBudget.for_workspace(workspace, ledger).charge(
            local.subjects,
            event,
            mechanism="finetune",
            model=model,
            base_version=card.version,
            dataset=schema.name,
        )
    return _Charged(event=event, noise_multiplier=sigma, delta=delta, charge=charge)


def _train(
    torch_model: nn.Module,
    local: _Local,
    charged: _Charged,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    stage: Callable[[str], None],
) -> int:
    """DP-SGD on the training records whose subjects were charged; their number."""
    from insitu.training import train

    admitted = charged.charge.admission.admitted
    x_train, y_train = local.x_train[admitted], local.y_train[admitted]
    stage(f"DP-SGD on {len(y_train)} records")
    train(
        torch_model,
        np.ascontiguousarray(x_train, dtype=np.float32),
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        event=charged.event,
        max_grad_norm=max_grad_norm,
    )
    return len(y_train)


def _figures(outcome: FinetuneResult, charged: _Charged, *, layers: int) -> dict[str, Any]:
    """What ``finetune.installed`` or ``finetune.rejected`` records."""
    return {
        "model": outcome.model,
        "base_version": outcome.base_version,
        "accuracy_installed": round(outcome.accuracy_installed, 6),
        "accuracy_finetuned": round(outcome.accuracy_finetuned, 6),
        "rows_train": outcome.rows_train,
        "rows_holdout": outcome.rows_holdout,
        "epsilon": outcome.epsilon,
        "epsilon_spent_total": round(outcome.epsilon_spent_total, 6),
        "excluded_over_budget": charged.charge.admission.excluded_over_budget,
        "noise_multiplier": outcome.noise_multiplier,
        "layers": layers,
    }


def _install(
    workspace: Workspace,
    client: UpdateClient,
    outcome: FinetuneResult,
    trained: nn.Module,
    candidate: bytes,
    *,
    card: ModelCard,
    schema: DataSchema,
    charged: _Charged,
    figures: dict[str, Any],
    layers: int,
) -> tuple[str, Path]:
    """Install ``candidate`` as the next local version and make it active (step 6).

    Returns its version and the file of its weights, kept for the next federated round.
    """
    from insitu._clock import utc_now
    from insitu.training import get_weights, weights_digest

    model = outcome.model
    version = _next_version(card.version, workspace, model)
    weights = get_weights(trained)
    weights_path = _save_weights(workspace, model, version, weights)
    blob, bundle_id = _bundle(
        workspace,
        candidate,
        outcome,
        version=version,
        card=card,
        schema=schema,
        charged=charged,
        layers=layers,
    )
    with client._exclusive():
        info = client.slots.install(
            blob, name=model, version=version, bundle_id=bundle_id, now=utc_now()
        )
    with workspace.ledger() as ledger:
        events.FINETUNE_INSTALLED.record(
            ledger,
            **figures,
            version=version,
            slot=info.slot,
            bundle_sha256=info.sha256,
            weights_sha256=weights_digest(weights),
            weights_file=str(weights_path.relative_to(workspace.home)),
            offered_as_start=True,
        )
    return version, weights_path


def _save_weights(
    workspace: Workspace, model: str, version: str, weights: list[np.ndarray]
) -> Path:
    weights_path = workspace.finetune_weights_path(model, version)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, *weights)
    atomic_write_bytes(weights_path, buffer.getvalue())
    return weights_path


def _bundle(
    workspace: Workspace,
    candidate: bytes,
    outcome: FinetuneResult,
    *,
    version: str,
    card: ModelCard,
    schema: DataSchema,
    charged: _Charged,
    layers: int,
) -> tuple[bytes, str]:
    """Record the training (``finetune.trained``), then bundle ``candidate`` to this device.

    Returns the bundle and its id.
    """
    from insitu.bundle import bundle_model

    model = outcome.model
    base_eps = float(card.privacy["epsilon"]) if card.privacy else 0.0
    # Per record: the federation's epsilon for other sites' records; this site's records
    # have spent at most the most any of its subjects spent (the fine-tune included).
    claimed = max(base_eps, charged.charge.epsilon_max_after)
    delta_claimed = max(float(card.privacy["delta"]) if card.privacy else 0.0, charged.delta)
    with workspace.ledger() as ledger:
        events.FINETUNE_TRAINED.record(
            ledger,
            run=f"finetune:{model}:{version}",
            model=model,
            base_version=card.version,
            onnx_sha256=hashlib.sha256(candidate).hexdigest(),
            epsilon_run=claimed,
            delta=delta_claimed,
            round_entries=[],
        )
    blob, bundle = bundle_model(
        workspace,
        candidate,
        name=model,
        version=version,
        recipients=[workspace.encryption_public_key],
        metrics={**card.metrics, "local_holdout_accuracy": round(outcome.accuracy_finetuned, 4)},
        epsilon=claimed,
        delta=delta_claimed,
        data_schema_sha256=schema.digest(),
        description=f"Local fine-tune of {model} {card.version} (last {layers} layer(s), "
        f"DP-SGD at epsilon {outcome.epsilon}).",
        drift_reference=card.drift_reference,
    )
    return blob, bundle.bundle_id


def local_start_weights(workspace: Workspace, model: str) -> list[np.ndarray] | None:
    """The weights of the latest installed local version of ``model``, digest-checked.

    A site offers them as the next federated round's starting point; ``None`` when the
    model was never fine-tuned here.

    Raises:
        InstallError: the weights file is missing or does not match its ledger digest.

    """
    from insitu.training import weights_digest

    with workspace.ledger() as ledger:
        entries = [
            e for e in ledger.entries(event_type=INSTALLED) if e.payload.get("model") == model
        ]
    if not entries:
        return None
    latest = entries[-1].payload
    path = workspace.home / latest["weights_file"]
    try:
        with np.load(path) as archive:
            weights = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    except OSError as exc:
        raise InstallError(f"cannot read the fine-tuned weights {path} ({exc})") from exc
    if weights_digest(weights) != latest["weights_sha256"]:
        raise InstallError(f"{path} does not match the digest the ledger recorded; it was altered")
    return weights
