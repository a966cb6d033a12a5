"""The ledger's vocabulary: every event type insitu records, with its payload, in one place.

Each :class:`Event` names a type (``domain.event``), says in one line what an entry of
it means, and declares its payload: the keys every entry carries (``fields``), the keys
it may carry (``optional``), and the JSON type of each. Domain code records through the
event, never with a string::

    events.BUNDLE_CREATED.record(ledger, model="triage", version="1.0.0", ...)

:meth:`Event.record` refuses (:class:`~insitu.errors.InvalidEventError`) a payload that
misses a field, carries a key the event does not declare (unless it is ``open``: the
figures of an audit or an optimization, whose keys follow their report), or holds a value
of another type. Readers filter on the same constants (``events.PRIVACY_SPENT.name``).

Invariants, each a test (``tests/audit/test_vocabulary.py``): every event the package
records is in :data:`VOCABULARY` (a ``.record(...)`` call on a ledger anywhere else in
``src/insitu`` fails the test, as does a planted unknown type); ``docs/ledger.md`` lists
exactly the events of :data:`VOCABULARY`; an event written from more than one place has
one writer function, named in its ``writer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from insitu.errors import InvalidEventError

if TYPE_CHECKING:
    from insitu.audit._ledger import Ledger
    from insitu.audit._records import Entry

__all__ = ["VOCABULARY", "Event"]

_NONE = type(None)
STR: tuple[type, ...] = (str,)
INT: tuple[type, ...] = (int,)
NUM: tuple[type, ...] = (int, float)
BOOL: tuple[type, ...] = (bool,)
LIST: tuple[type, ...] = (list,)
DICT: tuple[type, ...] = (dict,)
OPT_STR: tuple[type, ...] = (str, _NONE)
OPT_INT: tuple[type, ...] = (int, _NONE)
OPT_NUM: tuple[type, ...] = (int, float, _NONE)
OPT_DICT: tuple[type, ...] = (dict, _NONE)


@dataclass(frozen=True)
class Event:
    """One type of ledger entry and its payload (see the module docstring)."""

    name: str
    summary: str
    fields: Mapping[str, tuple[type, ...]]
    optional: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    #: The payload may carry further keys (figures whose names follow a report).
    open: bool = False
    #: Where entries are written (a module, or the one writer function).
    writer: str = ""

    def check(self, payload: Mapping[str, Any]) -> None:
        """Refuse a payload that does not fit this event.

        Raises:
            InvalidEventError: a missing field, an undeclared key, or a value of the
                wrong type (one line naming the event and the key).

        """
        missing = sorted(set(self.fields) - set(payload))
        if missing:
            raise InvalidEventError(f"{self.name}: payload misses {', '.join(missing)}")
        declared = {**self.fields, **self.optional}
        for key, value in payload.items():
            types = declared.get(key)
            if types is None:
                if not self.open:
                    raise InvalidEventError(
                        f"{self.name}: {key!r} is not a key of this event; declare it in "
                        "insitu.audit.events"
                    )
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = "/".join(t.__name__ for t in types)
                raise InvalidEventError(
                    f"{self.name}: {key!r} is {type(value).__name__}, expected {names}"
                )

    def record(self, ledger: Ledger, /, **payload: Any) -> Entry:
        """Check ``payload`` and append it to ``ledger`` as an entry of this type."""
        self.check(payload)
        return ledger.record(self.name, **payload)

    def entry(self, **payload: Any) -> tuple[str, dict[str, Any]]:
        """A checked ``(type, payload)`` pair for :meth:`Ledger.record_many`."""
        self.check(payload)
        return self.name, payload


def _event(
    name: str,
    summary: str,
    fields: Mapping[str, tuple[type, ...]],
    optional: Mapping[str, tuple[type, ...]] | None = None,
    *,
    open_payload: bool = False,
    writer: str,
) -> Event:
    return Event(name, summary, dict(fields), dict(optional or {}), open_payload, writer)


# -- workspace and data -------------------------------------------------------------

WORKSPACE_INIT = _event(
    "workspace.init",
    "a node's workspace was created: its id, name, version, whether keys are encrypted, "
    "where its signing key lives (file, or a PKCS#11 token and the key's URI)",
    {"node": STR, "name": STR, "insitu_version": STR, "keys_encrypted": BOOL},
    {
        "signing_key_store": STR,
        "signing_key_uri": STR,
        "signing_algorithm": STR,
        "decryption_key_store": STR,
        "decryption_key_uri": STR,
        "decryption_algorithm": STR,
    },
    writer="insitu.workspace._workspace",
)
WORKSPACE_KEYS_MIGRATED = _event(
    "workspace.keys_migrated",
    "a node's private keys moved from files into a PKCS#11 token: which keys, the token "
    "URIs and algorithms, which were made anew there (replaced: the decryption key); the "
    "key files were destroyed",
    {"node": STR, "keys": LIST, "store": STR},
    {"uris": DICT, "algorithms": DICT, "replaced": LIST, "resealed": LIST},
    writer="insitu.workspace._migrate",
)
WORKSPACE_MODEL_SIGNING_KEY = _event(
    "workspace.model_signing_key",
    "a node made its ECDSA P-256 key of OpenSSF model signatures: the public key, its SHA-256",
    {"node": STR, "algorithm": STR, "fingerprint": STR, "public_key": STR},
    writer="insitu.workspace._workspace",
)
DATA_PREPARED = _event(
    "data.prepared",
    "a raw table became a prepared release under a schema (counts and column names only)",
    {
        "dataset": STR,
        "schema_sha256": STR,
        "rows_in": INT,
        "rows_out": INT,
        "columns": LIST,
        "dropped": LIST,
        "undeclared": LIST,
        "pseudonymized": LIST,
        "k_requested": INT,
        "smallest_class": INT,
        "rows_suppressed": INT,
        "forced_below_k": BOOL,
        "sealed": BOOL,
    },
    # The SHA-256 of the sealed release (when sealed): what a run names in its rounds.
    # out_of_range: numeric feature -> released values outside its declared range (the
    # encoder clips them; a count, never a value).
    {"release_sha256": STR, "out_of_range": DICT},
    writer="insitu.data._site",
)
DATA_CONSENT_APPLIED = _event(
    "data.consent_applied",
    "a use took a data set's records: how many, and how many lacked consent",
    {
        "dataset": STR,
        "purpose": STR,
        "round": OPT_INT,
        "role": STR,
        "at": STR,
        "rows": INT,
        "excluded_without_consent": INT,
        "consent_required": BOOL,
        "legal_basis": OPT_STR,
    },
    writer="insitu.data._site",
)
CONSENT_CHANGED = _event(
    "consent.changed",
    "a subject (pseudonymous token) granted or withdrew consent for a purpose",
    {"subject": STR, "purpose": STR, "status": STR, "source": STR},
    writer="insitu.data._consent",
)
SCHEMA_INFERRED = _event(
    "schema.inferred",
    "a schema was inferred from the data under DP: columns dropped and what it cost",
    {
        "run": STR,
        "dataset": STR,
        "schema_sha256": STR,
        "dropped": DICT,
        "epsilon": NUM,
        "delta": NUM,
        "noise_multiplier": NUM,
    },
    writer="insitu.federated._simulate",
)

# -- privacy ---------------------------------------------------------------------------

_CHARGE: dict[str, tuple[type, ...]] = {
    "mechanism": STR,
    "run": STR,
    "noise_multiplier": NUM,
    "sample_rate": NUM,
    "steps": INT,
    "delta": NUM,
    "budget_epsilon": NUM,
    "candidates": INT,
    "excluded_over_budget": INT,
}
_CHARGE_CONTEXT: dict[str, tuple[type, ...]] = {
    "round": OPT_INT,
    "dataset": STR,
    "model": STR,
    "base_version": STR,
}
PRIVACY_SPENT = _event(
    "privacy.spent",
    "a use of records was charged to the cohort of subjects it took (digest of the cohort)",
    {
        **_CHARGE,
        "cohort_sha256": STR,
        "subjects": INT,
        "epsilon_run": NUM,
        "epsilon_max_after": NUM,
    },
    _CHARGE_CONTEXT,
    writer="insitu.privacy.SubjectBudget.charge",
)
PRIVACY_BUDGET_REFUSED = _event(
    "privacy.budget_refused",
    "a use was refused: no subject in it had budget left",
    {**_CHARGE, "spent_max": NUM},
    _CHARGE_CONTEXT,
    writer="insitu.privacy.SubjectBudget.charge",
)
PRIVACY_AUDIT = _event(
    "privacy.audit",
    "a membership-inference audit of a model: AUC and TPR at FPR beside the DP bound",
    {
        "run": OPT_STR,
        "model": STR,
        "onnx_sha256": STR,
        "members": INT,
        "non_members": INT,
        "attacks": LIST,
        "violation": BOOL,
    },
    open_payload=True,
    writer="insitu.attacks.record_membership_audit",
)
PRIVACY_ONE_RUN_AUDIT = _event(
    "privacy.one_run_audit",
    "a one-run white-box audit with canaries: empirical lower bound beside the claim",
    {
        "run": OPT_STR,
        "claimed_epsilon": NUM,
        "delta": NUM,
        "canaries": INT,
        "guesses": INT,
        "correct": INT,
        "epsilon_lower_bound": NUM,
        "flagged": BOOL,
    },
    open_payload=True,
    writer="insitu.attacks.record_one_run_audit",
)
PRIVACY_INVERSION = _event(
    "privacy.inversion",
    "a gradient-inversion demonstration: what a raw update and the DP sum reveal",
    {"data": STR, "model": STR, "sites": INT, "records_per_site": INT, "results": LIST},
    {"max_grad_norm": NUM, "noise_multiplier": NUM},
    writer="insitu.attacks.record_inversion",
)

# -- federation ----------------------------------------------------------------------

FEDERATION_STARTED = _event(
    "federation.started",
    "a federated run started: its settings and sites",
    {"run": STR, "dataset": STR, "schema_sha256": STR, "site_names": LIST},
    {"engine": STR, "reproducible": BOOL},
    open_payload=True,  # the run's settings (FederationConfig)
    writer="insitu.federated._server_app.record_started",
)
FEDERATION_ROUND = _event(
    "federation.round",
    "a round ended: sites that took part and were lost (why), accuracy and what it covers",
    {
        "run": STR,
        "round": INT,
        "sites_ok": INT,
        "failures": INT,
        "sites_evaluated": INT,
        "accuracy": OPT_NUM,
        "central_accuracy": OPT_NUM,
        "epsilon_run_max": NUM,
        # site name -> Flower node id; a lost site -> why (budget, error, dropout).
        "participants": DICT,
        "missing": DICT,
        "evaluation_missing": DICT,
    },
    writer="insitu.federated._server_app.record_round",
)
FEDERATION_CHECKPOINTED = _event(
    "federation.checkpointed",
    "the global model after a round was kept to resume from (weights and file digests)",
    {"run": STR, "round": INT, "model_sha256": STR, "checkpoint_sha256": STR},
    writer="insitu.federated._server_app.record_checkpointed",
)
FEDERATION_RESUMED = _event(
    "federation.resumed",
    "a stopped run went on after its last checkpointed round (rounds after it run again)",
    {"run": STR, "from_round": INT, "model_sha256": STR, "checkpoint_sha256": STR},
    writer="insitu.federated._server_app.record_resumed",
)
FEDERATION_COMPLETED = _event(
    "federation.completed",
    "a run completed every round: the model's digests, this run's privacy, its rounds",
    {
        "run": STR,
        "rounds": INT,
        "central_accuracy": OPT_NUM,
        "model_sha256": STR,
        "onnx_sha256": STR,
        "epsilon_run": OPT_NUM,
        "delta": OPT_NUM,
        "round_entries": LIST,
    },
    # The round whose model was kept, when it is not the last (simulate's RoundKeeper).
    {"kept_round": INT, "kept_because": STR},
    writer="insitu.federated._server_app.record_completed",
)
FEDERATION_FAILED = _event(
    "federation.failed",
    "a run stopped with no model: the round, each missing site and why",
    {"run": STR, "round": OPT_INT, "sites": DICT, "reason": STR},
    {"checkpoint_round": INT},  # the last good round, kept to resume from
    writer="insitu.federated._server_app.record_failed",
)
FEDERATION_BASELINE = _event(
    "federation.baseline",
    "a non-private centralized baseline beside the private model (simulation only)",
    {
        "run": STR,
        "method": STR,
        "baseline_accuracy": NUM,
        "private_accuracy": NUM,
        "train_rows": INT,
        "test_rows": INT,
    },
    writer="insitu.quickstart, insitu.federated._simulate",
)
EVALUATION_GROUPS = _event(
    "evaluation.groups",
    "the final model per group of persons: sites' noisy confusion counts per sensitive value",
    {
        "run": STR,
        "round": INT,
        "privacy": STR,
        "attributes": LIST,
        # attribute -> value -> {tp, fp, tn, fn}: sums over ``sites`` of noisy counts.
        "groups": DICT,
        "sites": LIST,
        "sites_missing": LIST,
        "noise_std": NUM,  # per cell and site (0: exact counts)
        "epsilon": OPT_NUM,
        "delta": OPT_NUM,
        "min_size": INT,
        "max_gap": NUM,
    },
    writer="insitu.federated._groups.record_groups",
)
FEDERATION_SITE_ROUND = _event(
    "federation.site_round",
    "a site trained one round: records and subjects used, left out, its epsilon",
    {
        "run": STR,
        "round": INT,
        "rows": INT,
        "subjects": INT,
        "excluded_without_consent": INT,
        "excluded_over_budget": INT,
        "steps": INT,
        "loss": NUM,
        "privacy": STR,
        "epsilon_run": NUM,
        "epsilon_spent_max": NUM,
    },
    {
        "attempt": INT,  # 2, 3...: the round trained again here (its run was resumed)
        # The sealed releases (training, held-out) the run uses: data.prepared's digests.
        "releases": LIST,
        # Numeric feature -> the site's training records outside its declared range
        # (the encoder clips them); present when there are any.
        "out_of_range": DICT,
    },
    writer="insitu.federated._site_app",
)
FEDERATION_EGRESS = _event(
    "federation.egress",
    "a site sent one message: bytes by kind and every metric it sent",
    {
        "run": STR,
        "site": STR,
        "round": OPT_INT,
        "message": STR,
        "stage": OPT_STR,
        "bytes_in": INT,
        "bytes_out": INT,
        "metrics_sent": DICT,
        "model_update_bytes": INT,
        "protocol_bytes": INT,
        "metrics_bytes": INT,
        "envelope_bytes": INT,
        "unclassified_bytes": INT,
    },
    {"spool": STR},  # a deployed site's spool file it was recorded from (recorded once)
    writer="insitu.federated._egress",
)
FEDERATION_SITES_REGISTERED = _event(
    "federation.sites_registered",
    "a server registered the site keys it admits (fingerprints, Flower node ids)",
    {"run": STR, "address": STR, "ca_sha256": STR, "sites": DICT},
    {"node_ids": DICT, "control": STR},
    writer="insitu.federated._superlink",
)
FEDERATION_SITE_JOINED = _event(
    "federation.site_joined",
    "a site started its SuperNode towards a server",
    {
        "site": STR,
        "server": STR,
        "ca_sha256": STR,
        "key": STR,
        "dataset": STR,
        "workspace_created": BOOL,
    },
    writer="insitu.federated._supernode",
)
FEDERATION_SITE_LEFT = _event(
    "federation.site_left",
    "a site's SuperNode stopped, after the runs it took part in",
    {"site": STR, "runs": LIST},
    writer="insitu.federated._supernode",
)
FEDERATION_SITE_REFUSED = _event(
    "federation.site_refused",
    "the server would not activate a site's key (not registered, or in use): the reason",
    {"site": STR, "server": STR, "key": STR, "reason": STR},
    writer="insitu.federated._supernode",
)
ATTESTATION_CHECKED = _event(
    "attestation.checked",
    "a verifier checked a site's or device's TPM 2.0 quote over a fresh nonce against its "
    "allow-list of measured states: who, which PCRs, the decision, for a refusal the "
    "PCR that differed, and the EK certificate's fingerprint when the AK is bound to it",
    {"subject": STR, "kind": STR, "decision": STR, "pcrs": LIST},
    {
        "reason": STR,
        "pcr": INT,
        "measurement": STR,
        "ak_fingerprint": STR,
        "ek_fingerprint": STR,
        "run": STR,
    },
    writer="insitu.attestation._verify",
)
PROCESSING_DECLARED = _event(
    "processing.declared",
    "the controller declared the processing (GDPR Art. 30 items; null: not declared)",
    {
        "controller": OPT_STR,
        "purposes": LIST,
        "data_subjects": OPT_STR,
        "legal_basis": OPT_STR,
        "recipients": OPT_STR,
        "transfers": OPT_STR,
        "retention": OPT_STR,
    },
    {"sites": INT, "schema_sha256": STR},
    writer="insitu.report.declare_processing",
)
QUICKSTART_STEP = _event(
    "quickstart.step",
    "a step of the quickstart ran (or did not), with its figures",
    {"run": STR, "step": STR, "status": STR, "summary": STR, "figures": DICT},
    {"seconds": NUM},
    writer="insitu.quickstart",
)

# -- models, bundles, updates --------------------------------------------------------

MODEL_OPTIMIZED = _event(
    "model.optimized",
    "a model was optimized for the edge: source, chosen candidate, what it learnt from",
    {"source_sha256": STR, "chosen": OPT_STR, "chosen_sha256": OPT_STR, "candidates": DICT},
    open_payload=True,
    writer="insitu.optimize._optimize",
)
FINETUNE_TRAINED = _event(
    "finetune.trained",
    "a device fine-tuned its model under DP: the candidate's digest and its epsilon",
    {
        "run": STR,
        "model": STR,
        "base_version": STR,
        "onnx_sha256": STR,
        "epsilon_run": NUM,
        "delta": NUM,
        "round_entries": LIST,
    },
    writer="insitu.finetune._finetune",
)
_FINETUNE_FIGURES: dict[str, tuple[type, ...]] = {
    "model": STR,
    "base_version": STR,
    "accuracy_installed": NUM,
    "accuracy_finetuned": NUM,
    "rows_train": INT,
    "rows_holdout": INT,
    "epsilon": NUM,
    "epsilon_spent_total": NUM,
    "excluded_over_budget": INT,
    "noise_multiplier": NUM,
    "layers": INT,
}
FINETUNE_INSTALLED = _event(
    "finetune.installed",
    "a fine-tuned model was better on local held-out records and was installed",
    {
        **_FINETUNE_FIGURES,
        "version": STR,
        "slot": STR,
        "bundle_sha256": STR,
        "weights_sha256": STR,
        "weights_file": STR,
        "offered_as_start": BOOL,
    },
    writer="insitu.finetune._finetune",
)
FINETUNE_REJECTED = _event(
    "finetune.rejected",
    "a fine-tuned model was not better and was not installed",
    {**_FINETUNE_FIGURES, "reason": STR},
    writer="insitu.finetune._finetune",
)
BUNDLE_CREATED = _event(
    "bundle.created",
    "a bundle was signed (and encrypted for its recipients)",
    {
        "model": STR,
        "version": STR,
        "bundle_id": STR,
        "bundle_sha256": STR,
        "encrypted": BOOL,
        "recipients": INT,
        "epsilon": OPT_NUM,
    },
    # The ML-BOM's digest and the fingerprint of the OpenSSF model-signing key.
    {"bom_sha256": STR, "oms_key": STR, "run": STR},  # run: the run the model came from
    writer="insitu.bundle._publish",
)
REPO_INITIALIZED = _event(
    "repo.initialized",
    "an update repository was created: its root's threshold and version",
    {"threshold": INT, "root_version": INT},
    # Role keys in a PKCS#11 token: "pkcs11" and the --key-uri they were made under.
    {"key_store": STR, "key_uri": STR},
    writer="insitu.update._repo_dir",
)
REPO_PUBLISHED = _event(
    "repo.published",
    "a bundle was published: its digest, length, deltas and the targets version",
    {
        "model": STR,
        "version": STR,
        "bundle_sha256": STR,
        "bundle_length": INT,
        "deltas": LIST,
        "pointers": LIST,
        "targets_version": INT,
    },
    writer="insitu.update._repository",
)
REPO_PUBLISH_REFUSED = _event(
    "repo.publish_refused",
    "a bundle was refused by the repository (the error's name)",
    {"reason": STR},
    writer="insitu.update._repository",
)
REPO_PUBLISHERS_CHANGED = _event(
    "repo.publishers_changed",
    "the keys allowed to publish changed (a new root version)",
    {"root_version": INT, "publishers": INT},
    writer="insitu.update._repository",
)
REPO_KEYS_ROTATED = _event(
    "repo.keys_rotated",
    "a repository role's keys were rotated",
    {"role": STR, "keys": INT},
    {"key_uris": LIST},  # the new keys' URIs, when they are in a PKCS#11 token
    writer="insitu.update._repository",
)
REPO_TIMESTAMP = _event(
    "repo.timestamp",
    "the repository's timestamp was re-signed (freshness)",
    {"version": INT},
    writer="insitu.update._repo_dir",
)
REPO_ATTESTATION_SET = _event(
    "repo.attestation_set",
    "the repository began or stopped requiring a fresh TPM quote of every device it publishes "
    "for: the allow-list's digest, its measured states and PCRs, and the pinned EK CAs' digest",
    {"required": BOOL},
    {"allow_list_sha256": STR, "states": INT, "pcrs": LIST, "ek_ca_sha256": STR},
    writer="insitu.update._attest",
)
REPO_ATTESTATION_ENROLLED = _event(
    "repo.attestation_enrolled",
    "a device's TPM attestation key was enrolled with the repository: the device's key id "
    "and the AK's fingerprint",
    {"device": STR, "ak_fingerprint": STR},
    writer="insitu.update._attest",
)
UPDATE_ENROLLED = _event(
    "update.enrolled",
    "a device enrolled with a repository for a model and channel (and its version floor)",
    {"model": STR, "channel": STR, "device_key_id": STR},
    {"floor": OPT_STR},
    writer="insitu.update._client",
)
UPDATE_DOWNLOADED = _event(
    "update.downloaded",
    "a device downloaded a target (bundle or delta), verified by TUF",
    {"model": STR, "target": STR, "kind": STR, "length": INT},
    writer="insitu.update._client",
)
UPDATE_REFUSED = _event(
    "update.refused",
    "a device refused what the repository served (the attack's name)",
    {"model": STR, "action": STR, "reason": STR},
    writer="insitu.update._client",
)
UPDATE_DELTA_REFUSED = _event(
    "update.delta_refused",
    "a delta did not rebuild the signed bundle; the full bundle was fetched",
    {"model": STR, "target": STR, "reason": STR},
    writer="insitu.update._client",
)
UPDATE_INSTALLED = _event(
    "update.installed",
    "a version was installed into a slot and made active",
    {
        "model": STR,
        "version": STR,
        "previous": OPT_STR,
        "slot": STR,
        "bundle_sha256": STR,
        "republishes": OPT_STR,
    },
    writer="insitu.update._client",
)
UPDATE_ROLLED_BACK = _event(
    "update.rolled_back",
    "the previous version was made active again",
    {"model": STR, "version": STR, "from_version": STR, "slot": STR},
    writer="insitu.update._client",
)
UPDATE_REPAIRED = _event(
    "update.repaired",
    "a damaged or swapped slot was reinstalled from the repository (what was wrong)",
    {"model": STR, "version": STR, "slot": STR, "damage": STR, "bundle_sha256": STR},
    writer="insitu.update._client",
)
UPDATE_FAILED = _event(
    "update.failed",
    "an update or rollback stopped: the update directory could not be written (errno)",
    {"model": STR, "action": STR, "reason": STR, "path": STR},
    writer="insitu.update._disk",
)

# -- running ------------------------------------------------------------------------

INFERENCE_LOADED = _event(
    "inference.loaded",
    "a verified model was loaded in memory for inference",
    {
        "model": STR,
        "version": STR,
        "bundle_id": STR,
        "previous": OPT_STR,
        "reason": STR,
        "signature_verified": BOOL,
    },
    writer="insitu.runtime._runtime",
)
INFERENCE_COUNTED = _event(
    "inference.counted",
    "inference requests, rows and errors in one hour (counts, never inputs)",
    {
        "model": STR,
        "version": STR,
        "hour": STR,
        "requests": INT,
        "rows": INT,
        "errors": INT,
        "partial": BOOL,
    },
    writer="insitu.runtime._usage",
)
EGRESS_BLOCKED = _event(
    "egress.blocked",
    "a connection or lookup to another host was refused while a model ran",
    {"event": STR, "destination": STR, "attempts": INT},
    writer="insitu.runtime._guard",
)
_DRIFT: dict[str, tuple[type, ...]] = {
    "model": STR,
    "version": STR,
    "feature": STR,
    "psi": NUM,
    "p_value": NUM,
    "rows": INT,
    "psi_threshold": NUM,
    "p_value_threshold": NUM,
}
DRIFT_DETECTED = _event(
    "drift.detected",
    "a feature's live distribution left its reference (PSI and chi-square both flag)",
    _DRIFT,
    writer="insitu.drift._monitor",
)
DRIFT_CLEARED = _event(
    "drift.cleared",
    "a feature flagged earlier is back within its thresholds",
    _DRIFT,
    writer="insitu.drift._monitor",
)
DRIFT_PROFILE_RELEASED = _event(
    "drift.profile_released",
    "a site released noisy reference histograms (charged to its subjects)",
    {
        "dataset": STR,
        "histograms": INT,
        "noise_std": NUM,
        "epsilon": NUM,
        "epsilon_spent_max": NUM,
        "excluded_over_budget": INT,
        "run": STR,
    },
    writer="insitu.drift._release",
)

#: Every event type insitu records, by name.
VOCABULARY: dict[str, Event] = {
    value.name: value for value in list(globals().values()) if isinstance(value, Event)
}
