"""The checkpoint of a federated run: what a restarted server needs to go on from a round.

After every completed round the aggregator writes ``checkpoint.npz`` in the run's
directory, in one atomic step (temporary file, fsync, rename: ``insitu._atomic``), so
a crash leaves the previous round's checkpoint or this one, never half of either. One
file holds everything, so nothing can disagree:

* the global weights after the round (``weights_000``, ``weights_001``, ... as float32);
* ``manifest``: UTF-8 JSON (format ``insitu-checkpoint/1``) with the run's id, the
  completed round and the rounds planned, the weights' digest (``weights_digest``), the
  run's settings and its SecAgg+ parameters, each site's epsilon of this run so far, and
  every completed round's record (``RoundRecord.to_json``).

A checkpoint is never a result: a run that stops keeps it to be resumed, and no model
is written from it until every planned round has run. Its SHA-256 names it: the resume
plan carries it and the server refuses a checkpoint whose bytes differ.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from insitu._atomic import atomic_write_bytes
from insitu.errors import FederationError
from insitu.training import weights_digest

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "Checkpoint"]

CHECKPOINT_FORMAT = "insitu-checkpoint/1"
#: The checkpoint's file name in the run directory.
CHECKPOINT_NAME = "checkpoint.npz"


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after its completed round ``round`` (see the module docstring)."""

    run_id: str
    round: int
    rounds_planned: int
    weights: list[np.ndarray] = field(repr=False)
    #: ``FederationConfig.to_json()`` of the run.
    config: dict[str, Any]
    #: The SecAgg+ parameters the rounds ran with (``{}`` without secure aggregation).
    secure_aggregation: dict[str, Any]
    #: Each site's epsilon of this run so far (the most it reported in any round).
    epsilon_run_by_site: dict[str, float]
    #: Every completed round's record (``RoundRecord.to_json``), oldest first.
    history: list[dict[str, Any]]

    @property
    def model_sha256(self) -> str:
        """The digest of the weights (``insitu.training.weights_digest``)."""
        return weights_digest(self.weights)

    def manifest(self) -> dict[str, Any]:
        """Everything but the weights, as JSON."""
        return {
            "format": CHECKPOINT_FORMAT,
            "run": self.run_id,
            "round": self.round,
            "rounds_planned": self.rounds_planned,
            "model_sha256": self.model_sha256,
            "config": self.config,
            "secure_aggregation": self.secure_aggregation,
            "epsilon_run_by_site": self.epsilon_run_by_site,
            "history": self.history,
        }

    def to_bytes(self) -> bytes:
        """The ``.npz`` file's bytes (no pickled object: read with ``allow_pickle=False``)."""
        arrays = {
            f"weights_{i:03d}": np.ascontiguousarray(w, dtype=np.float32)
            for i, w in enumerate(self.weights)
        }
        text = json.dumps(self.manifest(), sort_keys=True).encode()
        buffer = io.BytesIO()
        np.savez(buffer, manifest=np.frombuffer(text, dtype=np.uint8), **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    def write(self, run_dir: Path) -> str:
        """Write ``run_dir/checkpoint.npz`` atomically; its SHA-256."""
        data = self.to_bytes()
        atomic_write_bytes(run_dir / CHECKPOINT_NAME, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def read(cls, path: Path, *, sha256: str | None = None) -> Checkpoint:
        """The checkpoint at ``path``; with ``sha256``, only if its bytes have that digest.

        Raises:
            FederationError: missing, unreadable, not a checkpoint, altered (its digest
                or its weights' digest differ), one line naming the file.

        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FederationError(f"cannot read the checkpoint {path}: {exc.strerror}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise FederationError(
                f"the checkpoint {path} is not the one the resume plan names (SHA-256 "
                f"{digest[:12]}, expected {sha256[:12]}): refusing to resume from it"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                manifest = json.loads(npz["manifest"].tobytes().decode())
                names = sorted(n for n in npz.files if n.startswith("weights_"))
                weights = [np.array(npz[n]) for n in names]
            if manifest.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}")
            checkpoint = cls(
                run_id=str(manifest["run"]),
                round=int(manifest["round"]),
                rounds_planned=int(manifest["rounds_planned"]),
                weights=weights,
                config=dict(manifest["config"]),
                secure_aggregation=dict(manifest["secure_aggregation"]),
                epsilon_run_by_site={
                    str(k): float(v) for k, v in manifest["epsilon_run_by_site"].items()
                },
                history=list(manifest["history"]),
            )
        except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as exc:
            raise FederationError(f"{path} is not an insitu checkpoint ({exc})") from exc
        if checkpoint.model_sha256 != manifest.get("model_sha256"):
            raise FederationError(
                f"the weights in {path} are not the ones its manifest names: refusing them"
            )
        return checkpoint

    @staticmethod
    def digest(path: Path) -> str:
        """The SHA-256 of the checkpoint file at ``path``."""
        return hashlib.sha256(path.read_bytes()).hexdigest()
