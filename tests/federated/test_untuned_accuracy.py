"""Good by default on a table nobody tuned for: scikit-learn's breast-cancer data.

Issue 18: 3 sites, 5 rounds, defaults. Before, a private run was refused at the default
batch of 256 (larger than a site) and, given ``--batch-size 32``, the non-private run
reached 0.79 to 0.96 against 0.981 for a central logistic regression. The run here is
non-private, with the defaults only; it checks the floor, that ``simulate`` measured the
non-private baseline, and that it said which round it kept and which rules it followed.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from insitu.data import DataSchema
from insitu.federated import FederationConfig, simulate
from insitu.workspace import Workspace

sklearn_datasets = pytest.importorskip("sklearn.datasets")

pytestmark = [
    pytest.mark.slow,
    # Ray's processes close their files after the run (its own, not insitu's).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

#: Held-out accuracy the defaults must reach: well above the majority class (0.63). Each
#: coordinator holds out other rows (its own keyed split) and measures on about 51 of
#: them, so one run moves by several points (standard error ~0.04): the defaults gave
#: 0.95 and 0.98, and 0.80 once in a fresh-clone CI run that kept round 1; the old
#: defaults, with the --batch-size 32 they needed, 0.96, 0.84 and 0.79. A floor that
#: would tell the two apart fails by chance, so the accuracy goal is measured, not
#: asserted: benchmarks/untuned_bench.py (means of several runs, beside the central
#: baseline). What this test holds is that the defaults run untuned (the old ones were
#: refused) and learn, and that simulate says what it did.
FLOOR = 0.75


def _breast_cancer():
    data = sklearn_datasets.load_breast_cancer(as_frame=True)
    frame = data.frame.copy()
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    frame.insert(0, "patient_id", [f"P-{i:05d}" for i in range(len(frame))])
    frame["diagnosis"] = np.where(frame.pop("target") == 1, "benign", "malignant")
    features = [c for c in frame.columns if c not in ("patient_id", "diagnosis")]
    schema = DataSchema.from_dict(
        {
            "dataset": {
                "name": "breast_cancer",
                "label": "diagnosis",
                "positive": "malignant",
                "subject": "patient_id",
            },
            "features": {
                "numeric": features,
                # As a user writes them from a data dictionary: whole numbers around the data.
                "ranges": {
                    c: [math.floor(frame[c].min()), math.ceil(frame[c].max())] for c in features
                },
            },
            "identifiers": {"direct": ["patient_id"]},
            "treatment": {"pseudonymize": ["patient_id"]},
            "consent": {"required": False, "legal_basis": "public benchmark data"},
        }
    )
    return frame, schema


def test_defaults_reach_the_floor_on_breast_cancer_and_say_what_they_did(tmp_path):
    frame, schema = _breast_cancer()
    ws, _ = Workspace.init(tmp_path / "coordinator")
    environment = dict(os.environ)
    result = simulate(ws, frame, FederationConfig(sites=3, rounds=5, privacy="none"), schema=schema)
    # Ray's driver writes PYTHONPATH (its thirdparty_files and this venv) and more into
    # the process's environment: a process the caller starts afterwards (a device venv's
    # Python, in the test that found it) imported torch from here. It is put back, as
    # are the run's private HOME and Ray's token (libraries' import-time settings, such as
    # Ray's RAY_CLIENT_MODE, may stay).
    changed = {
        k for k in set(os.environ) | set(environment) if os.environ.get(k) != environment.get(k)
    }
    assert not {k for k in changed if k.startswith("PYTHON") or k in ("HOME", "RAY_AUTH_TOKEN")}
    assert result.central_accuracy is not None
    assert result.central_accuracy >= FLOOR
    assert result.baseline_accuracy is not None
    assert result.baseline_accuracy >= FLOOR
    assert result.kept_round in range(1, 6)
    assert "no privacy cost" in result.kept_because
    with ws.ledger() as ledger:
        (started,) = list(ledger.entries(event_type="federation.started"))
        (baseline,) = list(ledger.entries(event_type="federation.baseline"))
    assert "1/4 of a site's records" in started.payload["defaults"]
    assert baseline.payload["baseline_accuracy"] == round(result.baseline_accuracy, 4)
