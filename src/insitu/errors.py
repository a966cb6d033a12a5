"""The one exception tree of insitu.

Every error insitu raises on purpose is an :class:`InsituError`. Its message names the
problem *and* the fix, in one line, because the CLI prints exactly that line (no
traceback unless ``--debug``). Each class carries the process exit code the CLI uses:
1 for a failure, 2 for a usage error. Security failures are named after the failure,
as in python-tuf, so that a test or an operator reading a log knows what was refused::

    InsituError                          exit 1
    ├── UsageError                       exit 2  (bad option values, bad arguments)
    ├── MissingDependencyError           a verb needs a package this install lacks (an extra)
    ├── WorkspaceError
    │   ├── WorkspaceNotFoundError       no workspace where one was expected
    │   ├── WorkspaceNotWritableError    the home cannot be created or written
    │   └── ConfigError                  config.toml is missing, corrupt or invalid
    ├── KeyStoreError
    │   ├── KeyFileError                 a key file is missing, corrupt or of the wrong kind
    │   ├── PassphraseRequiredError      keys are encrypted and INSITU_PASSPHRASE is unset
    │   ├── WrongPassphraseError         the passphrase does not open the keys
    │   ├── SealedFileError              an encrypted cache that does not open (wrong key, altered)
    │   └── TokenError                   a PKCS#11 token that cannot be used for a key
    │       ├── TokenModuleError         the PKCS#11 module is missing or does not load
    │       ├── TokenKeyNotFoundError    no token of that label, or no key of that label in it
    │       └── WrongPinError            the token refused the PIN
    ├── DataError
    │   ├── SchemaError                  a data schema that is invalid or does not fit the data
    │   ├── DataFormatError              a data file that cannot be read, or bad values in it
    │   ├── KAnonymityError              a release that would fall below the requested k
    │   ├── ConsentError                 a consent file or change that cannot be applied
    │   └── UnusableSplitError           a local train/held-out split that is empty or one-class
    ├── PrivacyError
    │   ├── BudgetExceededError          no subject of a use has privacy budget left for it
    │   ├── BudgetEvidenceError          the record of privacy spent is incomplete or altered
    │   ├── InsufficientDataError        too few records for the requested epsilon
    │   └── AuditError                   an empirical privacy audit that cannot run as asked
    │       ├── OverlappingSetsError     a record both in the member and non-member sets
    │       ├── TooFewRecordsError       sets too small for the FPR asked (says how many)
    │       └── BoundViolationError      measured leakage above the (epsilon, delta) bound
    ├── OptimizationError                a model that cannot be optimized as asked
    │   ├── NotAModelError               a file that is not a model insitu can read
    │   ├── InputShapeMismatchError      data whose shape is not the model's input shape
    │   ├── UnsupportedOperatorError     an operator the exporter or ONNX Runtime cannot run
    │   └── ConstraintsNotMetError       no candidate meets the constraints (report written)
    ├── AttestationError                 a TPM quote that cannot be made or checked
    │   ├── TpmError                     the TPM or tpm2-tools cannot be used (missing, no answer)
    │   ├── AllowListError               an allow-list of measured states that cannot be read
    │   ├── AttestationRequiredError     a verifier requires a quote and none can be given
    │   ├── NonceLimitError              too many nonces outstanding at a verifier (HTTP 429)
    │   └── AttestationRefusedError      a verifier refused a site's or device's quote
    │       ├── UnknownAttestationKeyError  no attestation key enrolled for that subject
    │       ├── QuoteSignatureError      a quote not signed by the enrolled key, or altered
    │       ├── StaleQuoteError          a quote not over the verifier's fresh nonce (replayed)
    │       ├── EkCertificateError       an EK certificate off the pinned chain, or an unfit AK
    │       └── MeasurementMismatchError a PCR value that no allowed measured state has
    ├── FederationError                  a federated run that cannot start or complete
    │   ├── RoundFailedError             a round aggregated fewer sites than required
    │   ├── CertificateError             a TLS certificate or key missing, invalid or mismatched
    │   ├── ServerUnreachableError       the SuperLink does not answer at the address given
    │   └── SiteRefusedError             the SuperLink refused the site's key (not registered)
    ├── LedgerError
    │   ├── InvalidEventError            an event type or payload is not acceptable
    │   │   └── PersonalDataError        a payload value looks like personal data
    │   ├── ProofError                   an inclusion or consistency proof does not verify
    │   └── LedgerIntegrityError         verification failed; ``.seq`` is the first bad entry
    │       ├── MissingLedgerError       a ledger deleted, emptied, or without its init entry
    │       ├── MalformedLedgerError     unreadable rows or export lines
    │       ├── BrokenChainError         an entry deleted, inserted or reordered
    │       ├── EntryHashMismatchError   an entry's content was changed
    │       ├── BadEntrySignatureError   an entry not signed by this node's key
    │       ├── BadHeadSignatureError    a tree head not signed by this node's key (forged)
    │       ├── RootMismatchError        a signed head that does not match the entries
    │       └── TruncatedLedgerError     fewer entries than a trusted head covers
    ├── ReportError                      a compliance report that cannot be built or written
    │   └── UnverifiedEvidenceError      a ledger or artefact behind it fails verification
    ├── BundleError
    │   ├── MalformedBundleError         not a bundle, or a header that cannot be read
    │   ├── UnsignedBundleError          no signature, or one that does not verify
    │   ├── UntrustedPublisherError      validly signed, by a key that is not the publisher's
    │   ├── TamperedBundleError          payload bytes differ from the signed digests
    │   ├── WrongDeviceKeyError          this device's key cannot open the bundle
    │   ├── UnderstatedPrivacyError      a card stating less epsilon than the ledger records
    │   └── DeltaError                   a delta that cannot be made or applied
    │       └── DeltaMismatchError       a delta that does not rebuild the signed bundle
    ├── UpdateError
    │   ├── RepositoryError              the update repository on disk is missing or invalid
    │   ├── RepositoryUnavailableError   the repository cannot be reached (network, HTTP)
    │   ├── NotEnrolledError             this device has no trusted root yet
    │   ├── UpdateInProgressError        another update or rollback holds the lock
    │   ├── InstallError                 the A/B slots cannot be written or read
    │   │   └── NothingToRollBackError   no previous slot to return to
    │   └── UpdateRefusedError           TUF (or insitu) refused what the repository served
    │       ├── ExpiredMetadataError     freeze: signed metadata past its expiry
    │       ├── RollbackError            an older version than one already trusted
    │       ├── MixAndMatchError         metadata files from different repository states
    │       ├── UnsignedMetadataError    metadata without a threshold of trusted signatures
    │       └── TargetMismatchError      a download whose length or hash differs from metadata
    │           └── EndlessDataError     a download longer than its metadata says
    └── InferenceError                   a model that cannot be loaded or run as asked
        ├── ModelNotFoundError           no installed model of that name
        ├── InvalidInputError            an input that does not fit the model card's schema
        │   └── UnreadableImageError     an uploaded image that cannot be decoded, or too large
        ├── EgressBlockedError           a network connection or lookup refused while serving
        ├── CannotListenError            the API cannot listen on its address (port in use)
        └── IsolationError               the server cannot be put in a network namespace
"""

from __future__ import annotations

__all__ = [
    "AllowListError",
    "AttestationError",
    "AttestationRefusedError",
    "AttestationRequiredError",
    "AuditError",
    "BadEntrySignatureError",
    "BadHeadSignatureError",
    "BoundViolationError",
    "BrokenChainError",
    "BudgetEvidenceError",
    "BudgetExceededError",
    "BundleError",
    "CannotListenError",
    "CertificateError",
    "ConfigError",
    "ConsentError",
    "ConstraintsNotMetError",
    "DataError",
    "DataFormatError",
    "DeltaError",
    "DeltaMismatchError",
    "EgressBlockedError",
    "EkCertificateError",
    "EndlessDataError",
    "EntryHashMismatchError",
    "ExpiredMetadataError",
    "FederationError",
    "InferenceError",
    "InputShapeMismatchError",
    "InsituError",
    "InstallError",
    "InsufficientDataError",
    "InvalidEventError",
    "InvalidInputError",
    "IsolationError",
    "KAnonymityError",
    "KeyFileError",
    "KeyStoreError",
    "LedgerError",
    "LedgerIntegrityError",
    "MalformedBundleError",
    "MalformedLedgerError",
    "MeasurementMismatchError",
    "MissingDependencyError",
    "MissingLedgerError",
    "MixAndMatchError",
    "ModelNotFoundError",
    "NonceLimitError",
    "NotAModelError",
    "NotEnrolledError",
    "NothingToRollBackError",
    "OptimizationError",
    "OverlappingSetsError",
    "PassphraseRequiredError",
    "PersonalDataError",
    "PrivacyError",
    "ProofError",
    "QuoteSignatureError",
    "ReportError",
    "RepositoryError",
    "RepositoryUnavailableError",
    "RollbackError",
    "RootMismatchError",
    "RoundFailedError",
    "SchemaError",
    "SealedFileError",
    "ServerUnreachableError",
    "SiteRefusedError",
    "StaleQuoteError",
    "TamperedBundleError",
    "TargetMismatchError",
    "TokenError",
    "TokenKeyNotFoundError",
    "TokenModuleError",
    "TooFewRecordsError",
    "TpmError",
    "TruncatedLedgerError",
    "UnderstatedPrivacyError",
    "UnknownAttestationKeyError",
    "UnreadableImageError",
    "UnsignedBundleError",
    "UnsignedMetadataError",
    "UnsupportedOperatorError",
    "UntrustedPublisherError",
    "UnusableSplitError",
    "UnverifiedEvidenceError",
    "UpdateError",
    "UpdateInProgressError",
    "UpdateRefusedError",
    "UsageError",
    "WorkspaceError",
    "WorkspaceNotFoundError",
    "WorkspaceNotWritableError",
    "WrongDeviceKeyError",
    "WrongPassphraseError",
    "WrongPinError",
]


class InsituError(Exception):
    """Base of every error insitu raises on purpose.

    ``exit_code`` is what the CLI exits with when this error reaches it.
    """

    exit_code: int = 1


class UsageError(InsituError):
    """The command was called wrongly (a bad option value, a missing argument)."""

    exit_code = 2


class MissingDependencyError(InsituError):
    """A command needs a package this install lacks (a device install has no PyTorch).

    The message names the package and the extra that brings it.
    """


class WorkspaceError(InsituError):
    """Something is wrong with the workspace directory."""


class WorkspaceNotFoundError(WorkspaceError):
    """No workspace at the given home."""


class WorkspaceNotWritableError(WorkspaceError):
    """The workspace home cannot be created or written to."""


class ConfigError(WorkspaceError):
    """``config.toml`` is missing, unreadable, or has invalid values."""


class KeyStoreError(InsituError):
    """A node key cannot be loaded."""


class KeyFileError(KeyStoreError):
    """A key file is missing, corrupt, or holds a key of the wrong kind."""


class PassphraseRequiredError(KeyStoreError):
    """The private keys are encrypted and no passphrase was given."""


class WrongPassphraseError(KeyStoreError):
    """The passphrase given does not decrypt the private keys."""


class SealedFileError(KeyStoreError):
    """An encrypted local file that does not open: another site's key, altered, or foreign."""


class TokenError(KeyStoreError):
    """A PKCS#11 token (HSM, smart card, TPM) cannot be used for the node's key."""


class TokenModuleError(TokenError):
    """The PKCS#11 module (the token's library) is missing or does not load."""


class TokenKeyNotFoundError(TokenError):
    """No token carries the label given, or the token holds no key of that label."""


class WrongPinError(TokenError):
    """The token refused the PIN (or locked it after wrong attempts)."""


class DataError(InsituError):
    """An error of the data layer."""


class SchemaError(DataError):
    """A data schema that is invalid, or that does not fit the data it is applied to."""


class DataFormatError(DataError):
    """A data file that cannot be read, or that holds values its schema does not allow."""


class KAnonymityError(DataError):
    """A prepared release whose smallest equivalence class is below the requested k."""


class ConsentError(DataError):
    """A consent file or consent change that cannot be applied."""


class UnusableSplitError(DataError):
    """A local training or held-out split that is empty or holds a single class."""


class PrivacyError(InsituError):
    """An error of privacy accounting or budgets."""


class BudgetExceededError(PrivacyError):
    """A site refused a use of its records: no subject in it has privacy budget left for it."""


class BudgetEvidenceError(PrivacyError):
    """The record of privacy spent at a site is incomplete or altered (a cohort file).

    Charging anyway would forget what was spent; every private use is refused until the
    evidence is restored.
    """


class InsufficientDataError(PrivacyError):
    """A site holds too few records to train at the requested epsilon."""


class AuditError(PrivacyError):
    """An empirical privacy audit (membership inference, inversion) that cannot run as asked."""


class OverlappingSetsError(AuditError):
    """Records found both in the member and in the non-member set."""


class TooFewRecordsError(AuditError):
    """Member or non-member sets too small to read a TPR at the requested FPR."""


class BoundViolationError(AuditError):
    """A measured attack whose TPR interval lies wholly above e^epsilon * FPR + delta.

    Either the epsilon on paper is wrong (an accounting or implementation bug) or the
    model was not trained as recorded. The audit's report is written before this is raised.
    """


class OptimizationError(InsituError):
    """A model that cannot be exported, quantized, pruned or distilled as asked."""


class NotAModelError(OptimizationError):
    """A file that is not a model insitu can read (not ONNX, not a saved program, empty)."""


class InputShapeMismatchError(OptimizationError):
    """Calibration or evaluation data whose shape differs from the model's input."""


class UnsupportedOperatorError(OptimizationError):
    """An operator that the exporter or ONNX Runtime's CPU provider cannot run."""


class ConstraintsNotMetError(OptimizationError):
    """No candidate meets the constraints; the report and the table are produced first."""


class AttestationError(InsituError):
    """A TPM quote that cannot be made or checked (see :mod:`insitu.attestation`)."""


class TpmError(AttestationError):
    """The TPM or tpm2-tools cannot be used: not installed, no TCTI, no answer, a tool failed."""


class AllowListError(AttestationError):
    """An allow-list of measured states that is missing, not TOML, or malformed."""


class AttestationRequiredError(AttestationError):
    """A verifier requires a TPM quote and the site or device gives none (no TPM, no quote).

    A server started with ``--attest``, or a repository that requires attestation.
    """


class NonceLimitError(AttestationError):
    """A verifier holds as many outstanding nonces as it allows (per subject or in all)."""


class AttestationRefusedError(AttestationError):
    """A verifier refused a site's or device's quote; the message names why (and the PCR)."""


class UnknownAttestationKeyError(AttestationRefusedError):
    """No attestation key is enrolled for the subject that presented the quote."""


class QuoteSignatureError(AttestationRefusedError):
    """A quote whose signature does not verify against the enrolled AK, or that is altered."""


class StaleQuoteError(AttestationRefusedError):
    """A quote that is not over the verifier's fresh nonce: replayed, expired or foreign."""


class EkCertificateError(AttestationRefusedError):
    """An EK certificate that does not chain to a pinned CA, or an AK unfit to attest."""


class MeasurementMismatchError(AttestationRefusedError):
    """A quoted PCR whose value no allowed measured state has (``.pcr`` names it)."""

    def __init__(self, message: str, *, pcr: int | None = None) -> None:
        super().__init__(message)
        self.pcr = pcr


class FederationError(InsituError):
    """A federated run that cannot start or complete (too few sites, a failed round)."""


class RoundFailedError(FederationError):
    """A round of a federated run aggregated fewer sites than required; the run has no model.

    ``round`` is the round, ``sites`` names each site that did not contribute with its
    reason (budget, dropout, error).
    """

    def __init__(self, message: str, *, round_number: int, sites: dict[str, str]) -> None:
        super().__init__(message)
        self.round = round_number
        self.sites = dict(sites)


class CertificateError(FederationError):
    """A federation's TLS certificate or key that is missing, invalid or does not match."""


class ServerUnreachableError(FederationError):
    """The SuperLink did not answer at the address given, after retries with backoff."""


class SiteRefusedError(FederationError):
    """The SuperLink refused this site: its authentication key is not registered."""


class LedgerError(InsituError):
    """An error of the audit ledger."""


class InvalidEventError(LedgerError):
    """An event type or payload that the ledger refuses to record."""


class PersonalDataError(InvalidEventError):
    """A payload value that looks like personal data (the ledger never holds any)."""


class ProofError(LedgerError):
    """A Merkle inclusion or consistency proof that does not verify."""


class LedgerIntegrityError(LedgerError):
    """The ledger (or an export of it) failed verification.

    ``seq`` is the sequence number of the first entry found bad, or ``None`` when the
    failure is not tied to one entry (a forged head, a malformed header).
    """

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class MissingLedgerError(LedgerIntegrityError):
    """A workspace's ledger that is missing, empty, or does not start with its init entry.

    Every workspace's ledger starts with the entry ``insitu init`` wrote; without it
    there is no history to verify, which is never "0 entries, OK". ``seq`` is 1.
    """


class MalformedLedgerError(LedgerIntegrityError):
    """A ledger row or export line that cannot be read as an entry."""


class BrokenChainError(LedgerIntegrityError):
    """The hash chain is broken: an entry was deleted, inserted or moved."""


class EntryHashMismatchError(LedgerIntegrityError):
    """An entry's content does not match its hash: it was edited."""


class BadEntrySignatureError(LedgerIntegrityError):
    """An entry's signature does not verify under this node's public key."""


class BadHeadSignatureError(LedgerIntegrityError):
    """A signed tree head whose signature does not verify: forged or altered."""


class RootMismatchError(LedgerIntegrityError):
    """A correctly signed tree head whose root does not match the entries."""


class TruncatedLedgerError(LedgerIntegrityError):
    """The ledger holds fewer entries than a trusted signed head covers."""


class BundleError(InsituError):
    """A model bundle that cannot be created, read or trusted."""


class MalformedBundleError(BundleError):
    """Not an insitu bundle, or a header that cannot be parsed."""


class UnsignedBundleError(BundleError):
    """A bundle without a signature, or whose signature does not verify."""


class UntrustedPublisherError(BundleError):
    """A validly signed bundle, but signed by a key that is not the trusted publisher's."""


class TamperedBundleError(BundleError):
    """Payload bytes that differ from the digests the publisher signed."""


class WrongDeviceKeyError(BundleError):
    """The device's key is not among the bundle's recipients, or cannot unwrap the key."""


class UnderstatedPrivacyError(BundleError):
    """A card that would state a smaller epsilon than the ledger records for its model.

    Not a usage error: the command was well formed, but the bundle it asks for would
    understate the privacy cost of the training behind the model (or, for a private run,
    leave it out). Stating the recorded epsilon, or more, is the fix.
    """


class DeltaError(BundleError):
    """A delta update that cannot be computed or applied."""


class DeltaMismatchError(DeltaError):
    """A delta whose reconstruction does not match the signed digest of the bundle."""


class UpdateError(InsituError):
    """An error of the update repository or the update client."""


class RepositoryError(UpdateError):
    """The update repository directory is missing, incomplete, or invalid."""


class RepositoryUnavailableError(UpdateError):
    """The update repository cannot be reached or answered with an HTTP error."""


class NotEnrolledError(UpdateError):
    """The device has not been enrolled with an update repository yet."""


class UpdateInProgressError(UpdateError):
    """Another update or rollback of the same device is running."""


class InstallError(UpdateError):
    """The A/B install slots cannot be written or read."""


class NothingToRollBackError(InstallError):
    """No previous slot to roll back to."""


class UpdateRefusedError(UpdateError):
    """Metadata or a download refused by the TUF client workflow or by insitu's checks."""


class ExpiredMetadataError(UpdateRefusedError):
    """Signed metadata past its expiry: a freeze attack, or a repository not re-signed."""


class RollbackError(UpdateRefusedError):
    """A version older than one already trusted or installed."""


class MixAndMatchError(UpdateRefusedError):
    """Metadata files that do not belong to the same repository snapshot."""


class UnsignedMetadataError(UpdateRefusedError):
    """Metadata not signed by a threshold of the keys that root trusts for its role."""


class TargetMismatchError(UpdateRefusedError):
    """A downloaded file whose length or hash differs from the signed metadata."""


class EndlessDataError(TargetMismatchError):
    """A download that sends more bytes than the signed metadata allows."""


class ReportError(InsituError):
    """A compliance report that cannot be built or written (e.g. no Chromium for a PDF)."""


class UnverifiedEvidenceError(ReportError):
    """A ledger or an artefact behind a report failed verification: nothing was written."""


class InferenceError(InsituError):
    """A model that cannot be loaded or run as asked."""


class ModelNotFoundError(InferenceError):
    """No installed (or registered) model of the name asked for."""


class InvalidInputError(InferenceError):
    """An input that does not fit the model card's schema: shape, dtype, NaN/inf, size."""


class UnreadableImageError(InvalidInputError):
    """An uploaded image that cannot be decoded (not PNG or JPEG, truncated, corrupt).

    ``too_large``: refused from its header for claiming too many pixels (a decompression
    bomb), before anything was decoded.
    """

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class EgressBlockedError(InferenceError, PermissionError):
    """A connection or name lookup to another machine, refused while insitu runs a model.

    Also a :class:`PermissionError` (an ``OSError``), so that networking code which
    handles connection failures handles this one the same way.
    """


class CannotListenError(InferenceError):
    """The local API cannot listen on the address asked for (port in use, no permission)."""


class IsolationError(InferenceError):
    """``insitu serve --isolate`` cannot run the server in a network namespace of its own.

    ``unshare`` is missing, the kernel refuses unprivileged user namespaces, or a process
    claims isolation while it sees a network interface up.
    """
