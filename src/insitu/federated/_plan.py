"""The plan of a deployed run, typed on both sides of each process boundary.

A deployed run crosses two boundaries: ``insitu federate server`` hands the ServerApp
(in ``flwr-serverapp``) the whole :class:`RunPlan` through ``plan.json`` in the run
directory; the SuperLink hands every site (in ``flwr-clientapp``) the :class:`SharedPlan`
through Flower's run config. Both are plain JSON so that Flower can carry them; both are
read back through ``from_json``, which names the field that is missing or wrong instead of
failing later with a ``KeyError``. The shared plan never carries the server's paths.

A run on array data (images, signals) carries its input in both plans
(:class:`ArrayInput`: the records' kind, shape, value range and classes, and the array
schema's digest): the server builds the model of that shape, and a site refuses a run
whose input is not the one it prepared its records under, naming both shapes.

A run that stopped after a checkpointed round is resumed with the same plan plus a
:class:`ResumePoint` (:meth:`RunPlan.resumed`): the round it goes on after and the
checkpoint's path and SHA-256, which the ServerApp checks before using it. Sites receive
the same shared plan: a resumed run is the same run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from insitu.data import ArraySchema, DataSchema
from insitu.errors import FederationError, UsageError
from insitu.federated._config import FederationConfig
from insitu.workspace import Workspace

__all__ = [
    "PLAN_VERSION",
    "ArrayInput",
    "ResumePoint",
    "RunPlan",
    "SharedPlan",
    "SiteSetup",
    "deployed_schema",
    "refusals_dir",
]

#: Bumped when a field changes meaning; a process refuses a plan of another version.
PLAN_VERSION = 1
#: What a run id may be: sites name files after it.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    try:
        value = data[name]
    except KeyError:
        raise FederationError(
            f"the run plan has no '{name}'; server and sites must run the same insitu"
        ) from None
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise FederationError(
            f"the run plan's '{name}' is {type(value).__name__}, expected {kind.__name__}"
        )
    return value


def _check_version(data: dict[str, Any]) -> None:
    version = data.get("version")
    if version != PLAN_VERSION:
        raise FederationError(
            f"the run plan is version {version}, this insitu reads version {PLAN_VERSION}; "
            "server and sites must run the same insitu"
        )


@dataclass(frozen=True)
class ArrayInput:
    """The records a run on array data takes (from its array schema); typed, not a dict."""

    #: ``images`` (records C x H x W) or ``signals`` (C x L).
    kind: str
    shape: tuple[int, ...]
    value_range: tuple[float, float]
    #: The classes, in the order of the model's outputs.
    classes: tuple[str, ...]
    #: SHA-256 of the array schema (``ArraySchema.digest``).
    schema_sha256: str

    @classmethod
    def of(cls, schema: ArraySchema) -> ArrayInput:
        """The input an array schema declares."""
        return cls(
            kind=schema.kind,
            shape=schema.shape,
            value_range=schema.value_range,
            classes=tuple(schema.label_names),
            schema_sha256=schema.digest(),
        )

    def to_json(self) -> dict[str, Any]:
        """As carried in the plans."""
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "value_range": list(self.value_range),
            "classes": list(self.classes),
            "schema_sha256": self.schema_sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArrayInput:
        """Read it back; :class:`FederationError` names a bad field."""
        shape = _field(data, "shape", list)
        value_range = _field(data, "value_range", list)
        classes = _field(data, "classes", list)
        whole = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        if not shape or not whole:
            raise FederationError(f"the run plan's input shape {shape} is not positive integers")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value_range)
        if len(value_range) != 2 or not numbers:
            raise FederationError(f"the run plan's value range {value_range} is not [low, high]")
        if len(classes) < 2 or not all(isinstance(c, str) for c in classes):
            raise FederationError("the run plan's classes are not a list of class names")
        kind = _field(data, "kind", str)
        if kind not in ("images", "signals") or len(shape) != (3 if kind == "images" else 2):
            raise FederationError(f"the run plan's input is {kind} of shape {shape}")
        return cls(
            kind=kind,
            shape=tuple(shape),
            value_range=(float(value_range[0]), float(value_range[1])),
            classes=tuple(classes),
            schema_sha256=_field(data, "schema_sha256", str),
        )

    def describe(self) -> str:
        """The shape as the schema's axes name it: ``(1, 8, 8) (C, H, W)``."""
        axes = "C, H, W" if len(self.shape) == 3 else "C, L"
        return f"{self.shape} ({axes})"


def _array_input(data: dict[str, Any]) -> ArrayInput | None:
    value = data.get("input")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FederationError(f"the run plan's 'input' is {type(value).__name__}, expected dict")
    return ArrayInput.from_json(value)


@dataclass(frozen=True)
class SharedPlan:
    """What every site receives of a run: its settings, never the server's paths."""

    run_id: str
    config: FederationConfig
    dataset: str
    schema_sha256: str
    n_features: int
    site_noise_multiplier: float
    #: The records of a run on array data; ``None`` for a table.
    array_input: ArrayInput | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object sites receive in the run config."""
        return {
            "input": None if self.array_input is None else self.array_input.to_json(),
            "version": PLAN_VERSION,
            "run_id": self.run_id,
            "config": self.config.to_json(),
            "dataset": self.dataset,
            "schema_sha256": self.schema_sha256,
            "n_features": self.n_features,
            "site_noise_multiplier": self.site_noise_multiplier,
        }

    def dumps(self) -> str:
        """The run config value (Flower carries strings)."""
        return json.dumps(self.to_json())

    @classmethod
    def loads(cls, text: str) -> SharedPlan:
        """Read the run config value back; :class:`FederationError` names a bad field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FederationError(f"the run plan is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise FederationError("the run plan is not a JSON object")
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SharedPlan:
        """Read the JSON object back; :class:`FederationError` names a bad field."""
        _check_version(data)
        run_id = _field(data, "run_id", str)
        if not _RUN_ID.fullmatch(run_id):
            # Sites name files after the run (markers, refusals, privacy events).
            raise FederationError(
                f"the run plan's run id {run_id[:40]!r} is not a run id (letters, digits, "
                "'.', '_' and '-', not starting with '.'); refusing"
            )
        return cls(
            run_id=run_id,
            config=_config(_field(data, "config", dict)),
            dataset=_field(data, "dataset", str),
            schema_sha256=_field(data, "schema_sha256", str),
            n_features=_field(data, "n_features", int),
            site_noise_multiplier=_field(data, "site_noise_multiplier", float),
            array_input=_array_input(data),
        )


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run goes on: after ``from_round``, from this checkpoint."""

    #: The last completed (checkpointed) round: rounds ``from_round + 1`` to the end run.
    from_round: int
    checkpoint: Path
    #: SHA-256 of the checkpoint file: the ServerApp refuses a file with other bytes.
    checkpoint_sha256: str

    def to_json(self) -> dict[str, Any]:
        """As in ``plan.json``."""
        return {
            "from_round": self.from_round,
            "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResumePoint:
        """Read it back; :class:`FederationError` names a bad field."""
        return cls(
            from_round=_field(data, "from_round", int),
            checkpoint=Path(_field(data, "checkpoint", str)),
            checkpoint_sha256=_field(data, "checkpoint_sha256", str),
        )


@dataclass(frozen=True)
class RunPlan:
    """The server's whole plan of one deployed run (``plan.json`` in the run directory)."""

    shared: SharedPlan
    home: Path
    run_dir: Path
    feature_names: tuple[str, ...]
    #: The schema document the run was planned under (kept beside the model).
    schema_source: dict[str, Any]
    sites_registered: tuple[str, ...]
    #: Set when the run goes on from a checkpoint (:meth:`resumed`); ``None`` for a new run.
    resume: ResumePoint | None = None
    #: The array schema of a run on array data (kept beside the model); ``None``: a table.
    array_schema_source: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.shared.run_id

    @property
    def config(self) -> FederationConfig:
        """The run's settings."""
        return self.shared.config

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``plan.json`` (also kept in the model's ``record.json``)."""
        return self.shared.to_json() | {
            "home": str(self.home),
            "run_dir": str(self.run_dir),
            "feature_names": list(self.feature_names),
            "schema_source": self.schema_source,
            "sites_registered": list(self.sites_registered),
            "resume": None if self.resume is None else self.resume.to_json(),
            "array_schema_source": self.array_schema_source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        """Read ``plan.json`` back; :class:`FederationError` names a bad field."""
        resume, arrays = data.get("resume"), data.get("array_schema_source")
        for name, value in (("resume", resume), ("array_schema_source", arrays)):
            if value is not None and not isinstance(value, dict):
                raise FederationError(
                    f"the run plan's '{name}' is {type(value).__name__}, expected dict"
                )
        return cls(
            shared=SharedPlan.from_json(data),
            home=Path(_field(data, "home", str)),
            run_dir=Path(_field(data, "run_dir", str)),
            feature_names=tuple(_field(data, "feature_names", list)),
            schema_source=_field(data, "schema_source", dict),
            sites_registered=tuple(_field(data, "sites_registered", list)),
            resume=None if resume is None else ResumePoint.from_json(resume),
            array_schema_source=arrays,
        )

    @classmethod
    def resumed(cls, run_dir: Path) -> RunPlan:
        """The plan that resumes the stopped run in ``run_dir`` from its checkpoint.

        Reads ``run_dir/plan.json`` and ``run_dir/checkpoint.npz`` (checking that the
        checkpoint is this run's, under the same settings, with the weights its manifest
        names) and returns the plan with :attr:`resume` set to the checkpoint's round,
        path and SHA-256. Writes nothing: the caller writes ``plan.json`` from it and
        re-submits the run.

        Raises:
            FederationError: no plan or no checkpoint (the run stopped before its first
                round completed: start a new run), a checkpoint of another run or other
                settings, an altered checkpoint, or a run that already completed.

        """
        plan = cls.read(run_dir)
        # Here, not at the top: the checkpoint's weights digest needs PyTorch, and this
        # module is read by every ClientApp process (the egress witness).
        from insitu.federated._checkpoint import CHECKPOINT_NAME, Checkpoint

        path = plan.run_dir / CHECKPOINT_NAME
        if not path.exists():
            raise FederationError(
                f"run {plan.run_id} has no checkpoint ({path}): it stopped before a round "
                "completed; start a new run"
            )
        _refuse_completed(plan)
        checkpoint = Checkpoint.read(path)
        if checkpoint.run_id != plan.run_id or checkpoint.config != plan.config.to_json():
            raise FederationError(
                f"the checkpoint {path} is not run {plan.run_id}'s under its plan's settings; "
                "refusing to resume from it"
            )
        point = ResumePoint(checkpoint.round, path, Checkpoint.digest(path))
        return replace(plan, resume=point)

    @classmethod
    def read(cls, run_dir: Path) -> RunPlan:
        """The plan in ``run_dir/plan.json``."""
        path = run_dir / "plan.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FederationError(f"cannot read the run plan {path}: {exc}") from exc
        return cls.from_json(data)


def _refuse_completed(plan: RunPlan) -> None:
    """A run whose ``result.json`` names a model completed: there is nothing to resume."""
    try:
        result = json.loads((plan.run_dir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    if isinstance(result, dict) and "error" not in result:
        raise FederationError(
            f"run {plan.run_id} completed (its model is {result.get('model_dir', '?')}): "
            "there is nothing to resume"
        )


def _config(data: dict[str, Any]) -> FederationConfig:
    try:
        return FederationConfig(**data)
    except TypeError as exc:
        raise FederationError(
            f"the run plan's settings do not match this insitu ({exc}); "
            "server and sites must run the same insitu"
        ) from exc


def deployed_schema(
    schema: DataSchema | ArraySchema, config: FederationConfig
) -> tuple[DataSchema, ArraySchema | None]:
    """The table schema a deployed run plans under, and its array schema (``None``: a table).

    Array records become rows of their values (``insitu.data.array_table``): sites
    prepare, seal and train on them as on a table, under ``ArraySchema.table_schema``.

    Raises:
        UsageError: ``--model cnn`` with a table schema.

    """
    if isinstance(schema, ArraySchema):
        return schema.table_schema(), schema
    if config.model == "cnn":
        raise UsageError(
            f"--model cnn takes array data, but the schema {schema.name!r} declares a table: "
            "give an array schema (dataset.kind = 'images' or 'signals', an [arrays] section)"
        )
    return schema, None


def refusals_dir(home: Path) -> Path:
    """A site's refusals of runs: one file per run, named after it, holding why.

    Written by the ClientApp that refused the run, read by ``insitu federate site``,
    which stops and says why in one line (the ClientApp's own error stays in Flower's log).
    """
    return Workspace.layout(home).federation_dir / "refused"


@dataclass(frozen=True)
class SiteSetup:
    """A site's own side of a deployment (``federation/site.json`` in its workspace).

    Written by ``insitu federate site`` before its SuperNode starts, read by every
    ``flwr-clientapp`` the SuperNode starts: where the prepared parts are and which
    schema they were prepared under.
    """

    site: str
    dataset: str
    schema_sha256: str
    train_dir: Path
    test_dir: Path
    #: The records' input when the site prepared array data; ``None`` for a table.
    array_input: ArrayInput | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``site.json``."""
        return {
            "input": None if self.array_input is None else self.array_input.to_json(),
            "version": PLAN_VERSION,
            "site": self.site,
            "dataset": self.dataset,
            "schema_sha256": self.schema_sha256,
            "train_dir": str(self.train_dir),
            "test_dir": str(self.test_dir),
        }

    @classmethod
    def read(cls, home: Path) -> SiteSetup:
        """The set-up of the site whose workspace is ``home``."""
        path = Workspace.layout(home).site_setup_path
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FederationError(f"cannot read the site's set-up {path}: {exc}") from exc
        _check_version(data)
        return cls(
            site=_field(data, "site", str),
            dataset=_field(data, "dataset", str),
            schema_sha256=_field(data, "schema_sha256", str),
            train_dir=Path(_field(data, "train_dir", str)),
            test_dir=Path(_field(data, "test_dir", str)),
            array_input=_array_input(data),
        )
