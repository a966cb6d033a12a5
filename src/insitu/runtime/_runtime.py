"""The model runtime: verified in-memory sessions, cached under a budget, swapped live.

:class:`ModelRuntime` is what ``insitu serve``, ``insitu predict`` and ``insitu explain``
run models through. Invariants:

* a session is only ever built by :meth:`ModelSource.load`, i.e. by
  :func:`insitu.bundle.load_session`: signature and model digest checked on *every*
  load (a reload after idle unloading included), the plaintext in memory only;
* every input is checked against the model card (:mod:`._inputs`) before it runs;
* while the runtime is open, the egress guard is engaged (:mod:`._guard`);
* a newly installed version is loaded beside the running one and swapped in with one
  reference assignment: a batch that started on the old session finishes on it, the
  next one runs on the new one, and no request fails because of the swap;
* loaded models are kept under ``memory_budget`` bytes (estimated from the model's
  size; least recently used first out) and unloaded after ``idle_seconds`` unused;
* the ledger counts inferences per model version per hour (``inference.counted``:
  requests, rows, errors), never inputs or outputs.

Threads: each session uses ``threads`` intra-op threads and one inter-op thread, and its
idle workers sleep rather than spin. The default leaves one core to the caller (the
server's event loop, which parses requests while a batch runs): all cores but one, at
least one. The server runs one batch per model at a time (micro-batching), so the cores
go to one large batch rather than to many small calls competing. On this project's
2-core test machine, two spinning intra-op threads made a CNN batch 2-4x *slower* than
one thread whenever anything else ran (ADR 0502).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.audit import events
from insitu.audit.events import Event
from insitu.errors import InferenceError, InvalidInputError, ModelNotFoundError
from insitu.runtime._guard import egress_guard
from insitu.runtime._inputs import DEFAULT_MAX_ROWS, InputSpec, specs_of
from insitu.runtime._sources import InstalledModel, ModelSource
from insitu.runtime._usage import UsageCounter

if TYPE_CHECKING:
    from insitu.audit import Ledger
    from insitu.bundle import Bundle, ModelCard
    from insitu.workspace import Workspace

__all__ = ["BatchObserver", "LoadedModel", "ModelRuntime"]

logger = logging.getLogger(__name__)

#: ``observer(model_name, version, inputs, outputs)`` after each batch. ``inputs`` is the
#: first (for tabular models, the only) input, ``outputs`` the first output. Observers
#: must not keep the arrays (drift monitoring keeps statistics, never rows).
BatchObserver = Callable[[str, str, np.ndarray, np.ndarray], None]


@dataclass
class LoadedModel:
    """One verified, loaded model version."""

    name: str
    version: str
    bundle_id: str
    card: ModelCard
    session: Any = field(repr=False)
    token: str | None
    size: int
    inputs: list[InputSpec]
    output_names: list[str]
    loaded_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def input(self) -> InputSpec:
        """The first input (tabular models have exactly one)."""
        return self.inputs[0]

    def check(
        self, inputs: Any, *, max_rows: int = DEFAULT_MAX_ROWS, cast: bool = False
    ) -> dict[str, np.ndarray]:
        """Validated feeds for ``inputs``: an array (single-input models) or a mapping.

        ``cast``: see :meth:`InputSpec.check`.
        """
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                names = ", ".join(spec.name for spec in self.inputs)
                raise InvalidInputError(
                    f"model {self.name!r} takes several inputs ({names}); send an object "
                    "with one array per input name"
                )
            return {self.input.name: self.input.check(inputs, max_rows=max_rows, cast=cast)}
        unknown = set(inputs) - {spec.name for spec in self.inputs}
        if unknown:
            raise InvalidInputError(
                f"model {self.name!r} has no input named {sorted(unknown)[0]!r}; its inputs "
                f"are {', '.join(spec.describe() for spec in self.inputs)}"
            )
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InvalidInputError(f"model {self.name!r} needs input {spec.name!r}")
            feeds[spec.name] = spec.check(inputs[spec.name], max_rows=max_rows, cast=cast)
        rows = {len(value) for value in feeds.values()}
        if len(rows) > 1:
            raise InvalidInputError("every input must have the same number of rows")
        return feeds

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run`` of checked feeds (no observers, not counted)."""
        self.last_used = time.monotonic()
        outputs: list[np.ndarray] = self.session.run(None, dict(feeds))
        return outputs

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` lists."""
        return {
            "name": self.name,
            "version": self.version,
            "bundle_id": self.bundle_id,
            "inputs": self.card.inputs,
            "outputs": self.card.outputs,
            "metrics": self.card.metrics,
            "privacy": self.card.privacy,
            "description": self.card.description,
        }


def _model_size(bundle: Bundle) -> int:
    try:
        return int(bundle.signed["files"]["model.onnx"]["length"])
    except (KeyError, TypeError, ValueError):
        return 0


class ModelRuntime:
    """Models of one node, run in memory; see the module docstring.

    Use as a context manager (or call :meth:`start` and :meth:`close`): opening engages
    the egress guard and starts the watcher (hot swap, idle unloading, usage records).
    """

    def __init__(
        self,
        sources: Sequence[ModelSource],
        *,
        ledger: Ledger | None = None,
        memory_budget: int = 1 << 30,
        idle_seconds: float = 900.0,
        threads: int | None = None,
        spinning: bool = False,
        max_rows: int = DEFAULT_MAX_ROWS,
        watch_interval: float = 0.5,
        guard: bool = True,
    ) -> None:
        self._sources = {source.name: source for source in sources}
        self.ledger = ledger
        self.memory_budget = memory_budget
        self.idle_seconds = idle_seconds
        self.threads = threads or max(1, (os.cpu_count() or 1) - 1)
        self.spinning = spinning
        self.max_rows = max_rows
        self.watch_interval = watch_interval
        self._guard = guard
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._load_locks = {name: threading.Lock() for name in self._sources}
        self._observers: list[BatchObserver] = []
        self._swap_listeners: list[Callable[[LoadedModel], None]] = []
        self.usage = UsageCounter(self._record)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._owns_ledger = False

    @classmethod
    def for_workspace(cls, workspace: Workspace, **options: Any) -> ModelRuntime:
        """The model ``insitu update`` installed in ``workspace``, counted in its ledger.

        Raises:
            ModelNotFoundError: nothing was ever enrolled or installed there.

        """
        update_dir = workspace.update_dir
        if not (update_dir / "config.json").is_file():
            raise ModelNotFoundError(
                f"no model is installed in {workspace.home}; enroll with 'insitu update "
                "enroll' and install one with 'insitu update'"
            )
        source = InstalledModel(
            update_dir,
            device_key=workspace.encryption_key(),
            local_publisher=workspace.signing_public_key,
        )
        owned = "ledger" not in options
        if owned:
            options["ledger"] = workspace.ledger()
        runtime = cls([source], **options)
        runtime._owns_ledger = owned  # closed with the runtime
        return runtime

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> ModelRuntime:
        """Engage the egress guard and start watching for new versions."""
        if self._watcher is not None:
            return self
        if self._guard:
            if self.ledger is not None:
                egress_guard.add_recorder(self._record)
            egress_guard.engage()
        self._stop.clear()
        self._watcher = threading.Thread(
            target=self._watch, name="insitu-runtime-watch", daemon=True
        )
        self._watcher.start()
        return self

    def close(self) -> None:
        """Stop watching, write the usage counts, release the guard, drop sessions.

        A runtime made by :meth:`for_workspace` also closes the ledger it opened.
        """
        if self._watcher is not None:
            self._stop.set()
            self._watcher.join()
            self._watcher = None
            if self._guard:
                egress_guard.flush()
                egress_guard.release()
                egress_guard.remove_recorder(self._record)
        if self.ledger is not None:
            self.usage.flush(final=True)
        with self._lock:
            self._loaded.clear()
        if self._owns_ledger and self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def __enter__(self) -> ModelRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, event: Event, payload: dict[str, Any]) -> None:
        if self.ledger is not None:
            event.record(self.ledger, **payload)

    # -- models --------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Names of the models this runtime serves."""
        return sorted(self._sources)

    def add_observer(self, observer: BatchObserver) -> None:
        """Call ``observer`` after each batch (see :data:`BatchObserver`)."""
        self._observers.append(observer)

    def on_swap(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call ``listener(model)`` whenever a version is loaded."""
        self._swap_listeners.append(listener)

    def get(self, name: str) -> LoadedModel:
        """The loaded current version of ``name`` (loaded, and verified, if needed).

        Raises:
            ModelNotFoundError: no such model, or nothing installed for it.

        """
        model = self._loaded.get(name)
        if model is not None:
            model.last_used = time.monotonic()
            return model
        if name not in self._sources:
            raise ModelNotFoundError(
                f"no model named {name!r}; this node serves: {', '.join(self.names) or 'none'}"
            )
        with self._load_locks[name]:
            model = self._loaded.get(name)
            if model is None:
                model = self._load(name, reason="first use")
        return model

    def peek(self, name: str) -> LoadedModel | None:
        """The loaded current version of ``name``, or ``None`` (never loads: no I/O)."""
        model = self._loaded.get(name)
        if model is not None:
            model.last_used = time.monotonic()
        return model

    def loaded(self) -> dict[str, LoadedModel]:
        """The models loaded now (a copy)."""
        with self._lock:
            return dict(self._loaded)

    def _load(self, name: str, *, reason: str) -> LoadedModel:
        source = self._sources[name]
        token = source.current()
        if token is None:
            raise ModelNotFoundError(
                f"no version of {name!r} is installed; run 'insitu update' to install one"
            )
        bundle, session = source.load(intra_op_threads=self.threads, spinning=self.spinning)
        card = bundle.card
        model = LoadedModel(
            name=name,
            version=bundle.version,
            bundle_id=bundle.bundle_id,
            card=card,
            session=session,
            token=token,
            size=_model_size(bundle),
            inputs=specs_of(card.inputs),
            output_names=[str(output["name"]) for output in card.outputs],
        )
        if not model.inputs:
            raise InferenceError(f"model {name!r} declares no inputs in its card")
        with self._lock:
            previous = self._loaded.get(name)
            self._loaded[name] = model  # the swap: one reference assignment
            self._evict(keep=name)
        self._record(
            events.INFERENCE_LOADED,
            {
                "model": name,
                "version": model.version,
                "bundle_id": model.bundle_id,
                "previous": previous.version if previous else None,
                "reason": reason,
                "signature_verified": True,
            },
        )
        for listener in self._swap_listeners:
            listener(model)
        logger.info("loaded %s %s (%s)", name, model.version, reason)
        return model

    def _evict(self, *, keep: str) -> None:
        # Called with self._lock held. Least recently used first; the model just loaded
        # stays even when it alone exceeds the budget (with a warning).
        total = sum(m.size for m in self._loaded.values())
        for other in sorted(self._loaded.values(), key=lambda m: m.last_used):
            if total <= self.memory_budget:
                break
            if other.name == keep:
                continue
            del self._loaded[other.name]
            total -= other.size
            logger.info("unloaded %s %s (memory budget)", other.name, other.version)
        if total > self.memory_budget:
            logger.warning(
                "model %s alone exceeds the memory budget of %d bytes", keep, self.memory_budget
            )

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval):
            try:
                self.check_updates()
                self.unload_idle()
                self.usage.flush()
            except Exception:
                logger.exception("model watcher")

    def check_updates(self) -> list[str]:
        """Load any newly installed version of a loaded model; return the names swapped.

        A version that fails to load (a damaged slot, a bad signature) is logged and the
        running version keeps serving.
        """
        swapped = []
        for name, model in self.loaded().items():
            token = self._sources[name].current()
            if token is None or token == model.token:
                continue
            with self._load_locks[name]:
                if self._loaded.get(name) is not model:
                    continue
                try:
                    self._load(name, reason="new version installed")
                except Exception as exc:  # noqa: BLE001 -- keep serving the running version
                    logger.warning(
                        "cannot load the new version of %s (%s); keeping %s",
                        name,
                        exc,
                        model.version,
                    )
                    model.token = token  # do not retry a broken install every tick
                    continue
            swapped.append(name)
        return swapped

    def unload_idle(self) -> list[str]:
        """Unload models unused for ``idle_seconds``; return their names."""
        now = time.monotonic()
        with self._lock:
            idle = [n for n, m in self._loaded.items() if now - m.last_used > self.idle_seconds]
            for name in idle:
                del self._loaded[name]
        for name in idle:
            logger.info("unloaded %s (idle)", name)
        return idle

    # -- inference -----------------------------------------------------------------

    def run_batch(self, model: LoadedModel, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run checked feeds, notify observers, count the batch (not its content)."""
        rows = len(next(iter(feeds.values())))
        try:
            outputs = model.run(feeds)
        except Exception as exc:
            self.usage.add(model.name, model.version, requests=0, rows=rows, errors=1)
            raise InferenceError(f"model {model.name} {model.version} failed: {exc}") from exc
        for observer in self._observers:
            try:
                observer(model.name, model.version, feeds[model.input.name], outputs[0])
            except Exception:
                logger.exception("batch observer %r failed", observer)
        return outputs

    def predict(self, name: str, inputs: Any, *, cast: bool = True) -> dict[str, np.ndarray]:
        """Check ``inputs`` against the card, run them, return outputs by name.

        ``cast`` converts arrays of another float type (e.g. float64 from pandas).

        Raises:
            ModelNotFoundError: no such model.
            InvalidInputError: the input does not fit the card (nothing was run).

        """
        model = self.get(name)
        try:
            feeds = model.check(inputs, max_rows=self.max_rows, cast=cast)
        except InvalidInputError:
            self.usage.add(name, model.version, requests=1, rows=0, errors=1)
            raise
        outputs = self.run_batch(model, feeds)
        self.usage.add(name, model.version, requests=1, rows=len(outputs[0]), errors=0)
        return dict(zip(model.output_names, outputs, strict=False))
