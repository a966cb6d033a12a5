from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

SCHEMA = """
[dataset]
name = "readmission"
label = "readmitted"
positive = "yes"
subject = "patient_id"

[features]
numeric = ["age", "lab_value"]
categorical = ["sex", "ward"]

[features.categories]
sex = ["F", "M"]
ward = ["A", "B", "C"]

[features.ranges]
age = [0, 100]
lab_value = [0, 10]

[identifiers]
direct = ["patient_id", "name", "email", "ssn"]
quasi = ["age", "sex", "zip"]

[treatment]
drop = ["name", "ssn"]
pseudonymize = ["email"]
keep = ["zip"]
generalize = { age = "band:20", zip = "prefix:2" }

[privacy]
k = 2
"""


def make_patients(rows: int = 240, seed: int = 7) -> pd.DataFrame:
    """Synthetic patients, several records each, with planted direct identifiers."""
    rng = random.Random(seed)
    records = []
    for index in range(rows):
        patient = index % 60  # 60 patients, 4 records each
        records.append(
            {
                "patient_id": f"RAWID-{patient:04d}-Q",
                "name": f"Rawname Person{patient:04d}",
                "email": f"person{patient:04d}@clinic-example.org",
                "ssn": f"756.{patient:04d}.5555.{patient % 97:02d}",
                "age": str(20 + (patient % 4) * 20 + rng.randint(0, 9)),
                "zip": f"80{patient % 3}{rng.randint(0, 9)}",
                "sex": "F" if patient % 2 else "M",
                "ward": "ABC"[patient % 3],
                "lab_value": f"{rng.uniform(0, 10):.2f}",
                "notes": f"SECRET-NOTE-{index}",
                "readmitted": "yes" if rng.random() < 0.3 else "no",
            }
        )
    return pd.DataFrame.from_records(records)


@pytest.fixture
def patients_csv(tmp_path: Path) -> Path:
    path = tmp_path / "inputs" / "patients.csv"
    path.parent.mkdir(exist_ok=True)
    make_patients().to_csv(path, index=False)
    return path


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "inputs" / "patients.schema.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SCHEMA)
    return path
