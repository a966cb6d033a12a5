"""Privacy spent per data subject at one site, enforced by the site itself, across all uses.

A budget bound to a file or data-set name resets when the name changes; a budget bound
to the *people* does not. Every private use of records at a site (a federated round, a
fine-tune, a drift release, an evaluation) charges a :class:`~insitu.privacy.PrivacyEvent`
to the set of subjects whose records it used, its *cohort*. A subject's privacy spent is
the PLD composition of every event whose cohort holds it, whichever run, data set,
file name or API produced it. Subjects are 64-bit keys the data layer derives with the
site's secret: the pseudonym of the schema's subject column or, without one, a keyed
fingerprint of the row's content (``insitu.data``); nothing here sees an identifier.

Invariants (the charge is one critical section under a per-site file lock, so two
trainings at one site cannot both pass the check):

* after any sequence of charges, every subject's composed epsilon is at most the
  site's budget: a use admits only the subjects the event still fits
  (:meth:`SubjectBudget.admit`) and is refused outright when none remain;
* the ledger is the source of truth. A ``privacy.spent`` entry records the event and
  the SHA-256 of its cohort, whose sorted keys are kept in ``privacy/cohorts/<sha256>``
  (written before the entry, atomically). A cohort file that is missing or altered
  makes every later charge fail (:class:`~insitu.errors.BudgetEvidenceError`) rather
  than forget what was spent;
* ``privacy/index.npz`` (subject -> history) is a cache of the ledger, authenticated
  with a site key and tied to the last entry it covers; when it does not verify or lags
  behind, it is rebuilt or brought forward from the ledger, never trusted.

The charge happens *before* the records are used, for the steps planned: a use that then
fails has still spent (conservative, and the only safe order).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import io
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu._atomic import atomic_write_bytes, open_no_follow
from insitu.audit import events
from insitu.errors import BudgetEvidenceError, BudgetExceededError
from insitu.privacy._accountant import (
    ALPHAS,
    PrivacyEvent,
    epsilon_of,
    rdp_curve,
    rdp_epsilons,
)

if TYPE_CHECKING:
    from insitu.audit import Ledger
    from insitu.workspace import Workspace

__all__ = ["REFUSED", "SPENT", "Admission", "BudgetCharge", "SubjectBudget", "as_keys"]

logger = logging.getLogger(__name__)

SPENT = events.PRIVACY_SPENT.name
REFUSED = events.PRIVACY_BUDGET_REFUSED.name
_INDEX_FORMAT = 2
#: Histories whose PLD epsilon is computed for a figure, the worst by the RDP bound first
#: (RDP and PLD order histories of Gaussian events alike; the RDP value bounds the rest).
_WORST = 3


def as_keys(keys: np.ndarray | Sequence[int]) -> np.ndarray:
    """Subject keys as a sorted array of distinct unsigned 64-bit integers."""
    return np.unique(np.asarray(keys, dtype=np.uint64))


@dataclass(frozen=True)
class Admission:
    """Which of the candidate subjects an event still fits, and what it would cost them."""

    event: PrivacyEvent
    admitted: np.ndarray = field(repr=False)  # bool, aligned with the candidates given
    excluded_over_budget: int  # subjects, not rows
    epsilon_max_after: float  # the most any admitted subject would have spent in total
    subjects: int = 0  # subjects admitted


@dataclass(frozen=True)
class BudgetCharge:
    """A recorded charge: what was spent, on how many subjects, and the budget."""

    seq: int
    admission: Admission
    epsilon_run: float  # this run's events composed, for a subject in all of them
    budget: float
    delta: float

    @property
    def epsilon_max_after(self) -> float:
        """The most any charged subject has now spent at this site."""
        return self.admission.epsilon_max_after


class _Index:
    """Subject -> history, a history being a node of a trie of charges.

    Node 0 is the empty history; every other node is (its parent, one more charge), so
    subjects who took part in the same charges share one node, and applying a charge
    creates at most one node per distinct history among its cohort.
    """

    def __init__(
        self,
        keys: np.ndarray,
        hist: np.ndarray,
        charges: list[tuple[int, PrivacyEvent, str]],
        *,
        parent: list[int],
        charge_of: list[int],
        seq: int = 0,
        entry_hash: str = "",
    ) -> None:
        self.keys, self.hist = keys, hist  # sorted uint64 keys; node per key
        self.charges = charges  # (ledger seq, event, run)
        self.parent, self.charge_of = parent, charge_of
        self.seq, self.entry_hash = seq, entry_hash
        self._children = {
            (p, c): node for node, (p, c) in enumerate(zip(parent, charge_of, strict=True))
        }
        self._curves: dict[int, np.ndarray] = {}
        self._charge_curves: list[np.ndarray] = [rdp_curve(e) for _, e, _ in charges]

    @classmethod
    def empty(cls) -> _Index:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.int64), [], parent=[-1], charge_of=[-1])

    def charges_of(self, node: int) -> list[int]:
        """The charges of a history, oldest first."""
        found: list[int] = []
        while node > 0:
            found.append(self.charge_of[node])
            node = self.parent[node]
        return found[::-1]

    def events(self, node: int) -> list[PrivacyEvent]:
        return [self.charges[i][1] for i in self.charges_of(node)]

    def curve(self, node: int) -> np.ndarray:
        """The history's composed RDP curve (cached; a node adds one event to its parent)."""
        if node not in self._curves:
            chain = []
            probe = node
            while probe > 0 and probe not in self._curves:
                chain.append(probe)
                probe = self.parent[probe]
            total = self._curves.get(probe, np.zeros(len(ALPHAS)))
            for n in reversed(chain):
                total = total + self._charge_curves[self.charge_of[n]]
                self._curves[n] = total
            if node == 0:
                self._curves[0] = total
        return self._curves[node]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """History node of each key (0 for subjects never charged)."""
        if not len(self.keys):
            return np.zeros(len(keys), np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.hist[pos], 0)

    def apply(
        self, seq: int, entry_hash: str, event: PrivacyEvent, run: str, cohort: np.ndarray
    ) -> None:
        charge = len(self.charges)
        self.charges.append((seq, event, run))
        self._charge_curves.append(rdp_curve(event))
        merged = np.union1d(self.keys, cohort)
        hist = np.zeros(len(merged), np.int64)
        hist[np.searchsorted(merged, self.keys)] = self.hist
        members = np.searchsorted(merged, cohort)
        old, inverse = np.unique(hist[members], return_inverse=True)
        new_nodes = np.empty(len(old), np.int64)
        for j, node in enumerate(old.tolist()):
            child = self._children.get((node, charge))
            if child is None:
                child = len(self.parent)
                self.parent.append(node)
                self.charge_of.append(charge)
                self._children[(node, charge)] = child
            new_nodes[j] = child
        hist[members] = new_nodes[inverse]
        self.keys, self.hist = merged, hist
        self.seq, self.entry_hash = seq, entry_hash


class SubjectBudget:
    """The privacy budget of every data subject at one site (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        store: Path,
        *,
        epsilon_budget: float,
        delta: float,
        mac_key: bytes,
    ) -> None:
        if epsilon_budget <= 0 or not 0 < delta < 1:
            raise ValueError("a budget needs epsilon > 0 and 0 < delta < 1")
        self._ledger = ledger
        self._store = store
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self._mac_key = mac_key

    @classmethod
    def for_workspace(cls, workspace: Workspace, ledger: Ledger) -> SubjectBudget:
        """The budget of the site of ``workspace``, as configured there."""
        return cls(
            ledger,
            workspace.privacy_dir,
            epsilon_budget=float(workspace.config.get("privacy", "epsilon_budget")),
            delta=float(workspace.config.get("privacy", "delta")),
            mac_key=workspace.secret("data"),
        )

    # -- reading -------------------------------------------------------------------

    def _cohort_path(self, digest: str) -> Path:
        return self._store / "cohorts" / digest

    def _load_cohort(self, digest: str, seq: int) -> np.ndarray:
        path = self._cohort_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BudgetEvidenceError(
                f"{path} is missing: ledger entry {seq} charged privacy to the subjects it "
                "lists. Restore it from a backup of the site; until then no private use can "
                "be admitted"
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BudgetEvidenceError(
                f"{path} was altered (its SHA-256 is not the one ledger entry {seq} recorded); "
                "restore it from a backup of the site"
            )
        return np.frombuffer(data, dtype="<u8").astype(np.uint64)

    def _spent_entries(self, after: int = 0) -> list[Any]:
        return [e for e in self._ledger.entries(event_type=SPENT) if e.seq > after]

    def _index(self) -> _Index:
        index = self._load_index()
        if index is not None:
            entry = self._ledger.get(index.seq) if index.seq else None
            if index.seq and (entry is None or entry.hash.hex() != index.entry_hash):
                index = None  # the cache does not describe this ledger
        if index is None:
            index = _Index.empty()
        fresh = self._spent_entries(after=index.seq)
        for entry in fresh:
            payload = entry.payload
            event = PrivacyEvent(
                payload["noise_multiplier"], payload["sample_rate"], payload["steps"]
            )
            cohort = self._load_cohort(payload["cohort_sha256"], entry.seq)
            index.apply(entry.seq, entry.hash.hex(), event, str(payload.get("run", "")), cohort)
        if fresh:
            with contextlib.suppress(OSError):  # a cache: the ledger already holds the truth
                self._save_index(index)
        return index

    def _load_index(self) -> _Index | None:
        path, mac_path = self._store / "index.npz", self._store / "index.mac"
        try:
            data, mac = path.read_bytes(), mac_path.read_bytes()
        except FileNotFoundError:
            return None
        expected = hmac.new(self._mac_key, data, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, mac):
            logger.warning("%s does not verify; rebuilding it from the ledger", path)
            return None
        try:
            with np.load(io.BytesIO(data)) as archive:
                meta = json.loads(bytes(archive["meta"]).decode("utf-8"))
                keys, hist = archive["keys"].astype(np.uint64), archive["hist"].astype(np.int64)
                parent, charge_of = archive["parent"].tolist(), archive["charge"].tolist()
            if meta["format"] != _INDEX_FORMAT:
                return None
            return _Index(
                keys,
                hist,
                [(s, PrivacyEvent(n, q, t), r) for s, n, q, t, r in meta["charges"]],
                parent=parent,
                charge_of=charge_of,
                seq=int(meta["seq"]),
                entry_hash=str(meta["entry_hash"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s is unreadable (%s); rebuilding it from the ledger", path, exc)
            return None

    def _save_index(self, index: _Index) -> None:
        meta = {
            "format": _INDEX_FORMAT,
            "seq": index.seq,
            "entry_hash": index.entry_hash,
            "charges": [
                [s, e.noise_multiplier, e.sample_rate, e.steps, r] for s, e, r in index.charges
            ],
        }
        buffer = io.BytesIO()
        np.savez(
            buffer,
            keys=index.keys,
            hist=index.hist,
            parent=np.asarray(index.parent, np.int64),
            charge=np.asarray(index.charge_of, np.int64),
            meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        )
        data = buffer.getvalue()
        self._store.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._store / "index.npz", data, mode=0o600)
        mac = hmac.new(self._mac_key, data, hashlib.sha256).digest()
        atomic_write_bytes(self._store / "index.mac", mac, mode=0o600)

    def spent(self, keys: np.ndarray | Sequence[int] | None = None) -> float:
        """The most any of ``keys`` (default: any subject at this site) has spent."""
        index = self._index()
        nodes = index.hist if keys is None else index.lookup(np.asarray(keys, np.uint64))
        return self._worst(index, np.unique(nodes).tolist(), extra=None)

    def _worst(self, index: _Index, nodes: list[int], *, extra: PrivacyEvent | None) -> float:
        """The largest PLD epsilon among ``nodes`` (each plus ``extra``), worst by RDP first."""
        if not nodes:
            return 0.0
        add = np.zeros(len(ALPHAS)) if extra is None else rdp_curve(extra)
        bounds = rdp_epsilons(np.stack([index.curve(n) for n in nodes]) + add, delta=self.delta)
        ranked = [nodes[i] for i in np.argsort(-bounds, kind="stable")]
        tail = [] if extra is None else [extra]
        return max(epsilon_of([*index.events(n), *tail], delta=self.delta) for n in ranked[:_WORST])

    def subjects(self) -> int:
        """How many subjects have been charged at this site."""
        return len(self._index().keys)

    def run_events(self, run: str) -> list[PrivacyEvent]:
        """The events charged at this site for ``run`` so far, oldest first."""
        return [event for _, event, r in self._index().charges if r == run]

    # -- admitting and charging ---------------------------------------------------

    def _admit(self, index: _Index, keys: np.ndarray, event: PrivacyEvent) -> Admission:
        if not len(keys):  # a use that takes no record (none consented): nothing to charge
            return Admission(event, np.zeros(0, dtype=bool), 0, 0.0, 0)
        subjects, inverse = np.unique(keys, return_inverse=True)
        histories = index.lookup(subjects)
        nodes, position = np.unique(histories, return_inverse=True)
        step = rdp_curve(event)
        # The RDP bound admits at once; PLD only where RDP alone would refuse.
        bounds = rdp_epsilons(
            np.stack([index.curve(n) for n in nodes.tolist()]) + step, delta=self.delta
        )
        fit_nodes = bounds <= self.epsilon_budget
        for j in np.flatnonzero(~fit_nodes).tolist():
            events = [*index.events(int(nodes[j])), event]
            fit_nodes[j] = epsilon_of(events, delta=self.delta) <= self.epsilon_budget
        fits = fit_nodes[position]
        worst = self._worst(index, nodes[fit_nodes].tolist(), extra=event)
        return Admission(event, fits[inverse], int((~fits).sum()), worst, int(fits.sum()))

    def admit(self, keys: np.ndarray | Sequence[int], event: PrivacyEvent) -> Admission:
        """Which of ``keys`` (one per record a use would take) ``event`` still fits.

        ``admitted`` is aligned with ``keys`` (a subject's rows are all in or all out);
        ``excluded_over_budget`` counts subjects, not rows.
        """
        return self._admit(self._index(), np.asarray(keys, np.uint64), event)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._store.mkdir(parents=True, exist_ok=True)
        with open_no_follow(self._store / "budget.lock", append=True) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def charge(
        self,
        keys: np.ndarray | Sequence[int],
        event: PrivacyEvent,
        *,
        mechanism: str,
        run: str = "",
        **context: Any,
    ) -> BudgetCharge:
        """Spend ``event`` on the subjects of ``keys`` it still fits; record it.

        ``context`` (round number, data set, model...) is recorded with the entry; it
        must not hold personal data (the ledger refuses values that look like it).

        Raises:
            BudgetExceededError: no subject has budget left for ``event`` (recorded as
                ``privacy.budget_refused``; nothing is spent).
            BudgetEvidenceError: the record of earlier spending is incomplete.

        """
        keys = np.asarray(keys, np.uint64)
        with self._locked():
            index = self._index()
            admission = self._admit(index, keys, event)
            common = {
                "mechanism": mechanism,
                "run": run,
                **event.to_json(),
                "delta": self.delta,
                "budget_epsilon": self.epsilon_budget,
                "candidates": len(np.unique(keys)),
                "excluded_over_budget": admission.excluded_over_budget,
                **context,
            }
            if not admission.subjects:
                events.PRIVACY_BUDGET_REFUSED.record(
                    self._ledger, spent_max=self._max_spent(index), **common
                )
                # No count in the message: it may travel to a coordinator.
                raise BudgetExceededError(
                    f"no subject has privacy budget left for this {mechanism} (budget epsilon "
                    f"{self.epsilon_budget} per subject at this site; see privacy.budget_refused"
                    " in its ledger): refused. Raise privacy.epsilon_budget only if your DPO "
                    "agrees"
                )
            cohort = as_keys(keys[admission.admitted])
            digest = self._write_cohort(cohort)
            epsilon_run = self._epsilon_run(index, cohort, event, run)
            entry = events.PRIVACY_SPENT.record(
                self._ledger,
                cohort_sha256=digest,
                subjects=len(cohort),
                epsilon_run=epsilon_run,
                epsilon_max_after=admission.epsilon_max_after,
                **common,
            )
            index.apply(entry.seq, entry.hash.hex(), event, run, cohort)
            with contextlib.suppress(OSError):
                self._save_index(index)
        logger.info(
            "%s: %d subjects charged (%d over budget left out); at most epsilon %.3f of %.3f",
            mechanism,
            len(cohort),
            admission.excluded_over_budget,
            admission.epsilon_max_after,
            self.epsilon_budget,
        )
        return BudgetCharge(entry.seq, admission, epsilon_run, self.epsilon_budget, self.delta)

    def _epsilon_run(
        self, index: _Index, cohort: np.ndarray, event: PrivacyEvent, run: str
    ) -> float:
        """The most any subject of ``cohort`` has spent in ``run``, this event included."""
        in_run = {i for i, (_, _, r) in enumerate(index.charges) if run and r == run}
        restricted = {
            tuple(i for i in index.charges_of(node) if i in in_run)
            for node in np.unique(index.lookup(cohort)).tolist()
        }
        candidates = list(restricted)
        curves = np.stack(
            [
                sum((rdp_curve(index.charges[i][1]) for i in charges), rdp_curve(event))
                for charges in candidates
            ]
        )
        order = np.argsort(-rdp_epsilons(curves, delta=self.delta), kind="stable")
        ranked = [candidates[i] for i in order]
        return max(
            epsilon_of([*(index.charges[i][1] for i in charges), event], delta=self.delta)
            for charges in ranked[:_WORST]
        )

    def _write_cohort(self, cohort: np.ndarray) -> str:
        data = cohort.astype("<u8").tobytes()
        digest = hashlib.sha256(data).hexdigest()
        path = self._cohort_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data, mode=0o600)
        return digest

    def _max_spent(self, index: _Index) -> float:
        return self._worst(index, np.unique(index.hist).tolist(), extra=None)
