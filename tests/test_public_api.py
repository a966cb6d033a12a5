"""The public surface stays what was intended (as httpx does): a change here is deliberate."""

from __future__ import annotations

import importlib

import pytest

import insitu
import insitu.errors
from insitu.errors import InsituError, UsageError

EXPECTED = {
    "insitu": ["InsituError", "__version__"],
    "insitu.workspace": [
        "DEFAULT_HOME",
        "HOME_ENV",
        "PASSPHRASE_ENV",
        "Config",
        "Workspace",
        "resolve_home",
    ],
    "insitu.audit": [
        "CONSISTENCY_FORMAT",
        "CheckedProof",
        "EVENT_TYPE_PATTERN",
        "EXPORT_FORMAT",
        "Entry",
        "ExportVerification",
        "INCLUSION_FORMAT",
        "Ledger",
        "TreeHead",
        "VerificationReport",
        "check_proof",
        "consistency_document",
        "export_ledger",
        "inclusion_document",
        "node_id_for",
        "verify_consistency",
        "verify_entries",
        "verify_export",
        "verify_inclusion",
    ],
    "insitu.runtime": [
        "BatchObserver",
        "BundleFile",
        "EgressGuard",
        "Explainer",
        "Explanation",
        "InputSpec",
        "InstalledModel",
        "LoadedModel",
        "ModelRuntime",
        "ModelSource",
        "create_session",
        "egress_guard",
        "global_importance",
        "plot_global_importance",
        "predict_file",
    ],
    "insitu.serve": [
        "DEFAULT_HOST",
        "Background",
        "BackgroundSource",
        "MetricsSnapshot",
        "MicroBatcher",
        "RunningServer",
        "ServeMetrics",
        "check_bind",
        "create_app",
        "running",
        "serve",
        "site_background",
    ],
    "insitu.data": [
        "ColumnFinding",
        "ConsentChange",
        "ConsentRegistry",
        "DataSchema",
        "FeatureEncoder",
        "InferredSchema",
        "InspectReport",
        "KAnonymity",
        "PrepareReport",
        "PreparedData",
        "Pseudonymizer",
        "SUBJECT_COLUMN",
        "SiteDataset",
        "TrainingData",
        "infer_schema",
        "inspect_table",
        "load_prepared",
        "prepare",
        "read_table",
        "scan_column",
        "scan_frame",
        "subject_keys",
        "subject_tokens",
        "token_uniform",
        "write_prepared",
    ],
    "insitu.datasets": ["BUILTIN", "builtin_data", "builtin_schema"],
    "insitu.bundle": [
        "BUNDLE_MAGIC",
        "Bundle",
        "BundleVerifier",
        "ModelCard",
        "OpenedBundle",
        "SemVer",
        "apply_bundle_delta",
        "bundle_model",
        "create_bundle",
        "device_key_id",
        "load_session",
        "make_bundle_delta",
        "publisher_key_id",
        "schema_of",
    ],
    "insitu.update": [
        "ClientConfig",
        "DirectoryStorage",
        "MemoryStorage",
        "SlotInfo",
        "SlotStore",
        "Storage",
        "UpdateClient",
        "UpdateRepository",
        "init_directory_repository",
        "open_directory_repository",
        "rotate_directory_keys",
    ],
    "insitu.drift": [
        "OUTPUT",
        "DriftMonitor",
        "DriftThresholds",
        "FeatureDrift",
        "ProfileLayout",
        "ReferenceProfile",
        "bin_counts",
        "combine_releases",
        "drift_status",
        "noisy_release",
        "population_stability_index",
        "release_profile",
        "two_sample_p_value",
    ],
    "insitu.finetune": ["FinetuneResult", "finetune", "local_start_weights", "split_holdout"],
    "insitu.dashboard": ["MetricsSource", "router", "site_view"],
    "insitu.cli": ["app", "main", "run"],
    "insitu.optimize": [
        "CANDIDATES",
        "TARGETS",
        "Candidate",
        "Constraints",
        "OptimizationReport",
        "SourceModel",
        "load_model",
        "optimize",
        "optimize_workspace_model",
        "select",
    ],
    "insitu.report": [
        "ArtefactCheck",
        "Evidence",
        "LedgerEvidence",
        "Report",
        "build_report",
        "collect_evidence",
        "find_workspaces",
        "render_html",
        "render_pdf",
        "write_report",
    ],
    "insitu.privacy.attacks": [
        "ATTACKS",
        "AttackResult",
        "InsituMechanism",
        "InversionDemo",
        "InversionResult",
        "Mechanism",
        "MembershipAudit",
        "OneRunAudit",
        "Predict",
        "RocPoint",
        "RocSummary",
        "ShadowTrainer",
        "auc",
        "audit_membership",
        "check_sets",
        "dp_secagg_aggregate",
        "dp_tpr_bound",
        "epsilon_lower_bound",
        "infer_label",
        "insitu_mechanism",
        "inversion_demo",
        "invert_gradient",
        "lira_offline_scores",
        "logit_confidence",
        "loss_scores",
        "one_run_audit",
        "one_run_p_value",
        "per_record_loss",
        "raw_update",
        "record_one_run_audit",
        "required_non_members",
        "roc_curve",
        "tpr_at_fpr",
    ],
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_exported_names(module):
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(EXPECTED[module])
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_every_error_is_an_insitu_error_with_an_exit_code():
    for name in insitu.errors.__all__:
        cls = getattr(insitu.errors, name)
        assert issubclass(cls, InsituError), name
        assert cls.exit_code == (2 if issubclass(cls, UsageError) else 1), name


def test_the_error_tree_is_drawn_in_the_module_docstring():
    doc = insitu.errors.__doc__ or ""
    for name in insitu.errors.__all__:
        assert name in doc, f"{name} is missing from the tree in insitu/errors.py"
