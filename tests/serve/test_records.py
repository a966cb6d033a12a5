"""Records in, answers out: raw values encoded by the schema in the signed card, labels back.

The model card carries the data schema (``drift_reference["schema"]``); the server encodes
records by it, refuses what it does not allow (naming column and record), and reads the
outputs as classes and probabilities. ``insitu predict`` writes them beside a row key.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu.bundle import ModelCard, create_bundle, schema_of
from insitu.cli import run
from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.drift import ProfileLayout, combine_releases, noisy_release
from insitu.errors import InvalidInputError, SchemaError
from insitu.runtime import ModelRuntime, RecordSchema, predict_file
from insitu.serve import RunningServer, running
from tests.bundle._models import mlp
from tests.cli._device import BLOCKER
from tests.serve.conftest import Site, linear_model, make_site

PREDICT = "/v1/models/mlp/predict"


def tumour_schema(*, positive: str | None = "malignant") -> DataSchema:
    """A clinical schema: a log-scaled area, a binned radius, a banded age, two categories."""
    dataset: dict[str, Any] = {"name": "tumours", "label": "diagnosis", "subject": "patient_id"}
    if positive is not None:
        dataset["positive"] = positive
    return DataSchema.from_dict(
        {
            "dataset": dataset,
            "features": {
                "numeric": ["mean_area", "mean_radius", "age"],
                "categorical": ["sex", "site"],
                "ranges": {"mean_area": [0, 2500], "mean_radius": [5, 30], "age": [0, 100]},
                "transforms": {"mean_area": "log"},
                "bins": {"mean_radius": [10, 20]},
                "categories": {"sex": ["F", "M"], "site": ["A", "B", "C"]},
            },
            "identifiers": {"quasi": ["age"]},
            "treatment": {"generalize": {"age": "band:10"}},
            "consent": {"required": False, "legal_basis": "test"},
        }
    )


SCHEMA = tumour_schema()
WIDTH = len(FeatureEncoder.for_schema(SCHEMA).names)  # 3 numbers, 3 bins, 2 + 3 categories
RECORD: dict[str, Any] = {
    "patient_id": "p-0001",
    "mean_area": 648.2,
    "mean_radius": 14.1,
    "age": 50,
    "sex": "F",
    "site": "B",
}


def publish_with_schema(site: Site, version: str, model: bytes, schema: DataSchema) -> None:
    """Publish ``model`` with a card that carries ``schema`` (in its drift reference)."""
    layout = ProfileLayout.from_schema(schema)
    sample = np.random.default_rng(0).random((64, layout.n_inputs)).astype(np.float32)
    release, _ = noisy_release(layout, sample, None, epsilon=1.0, delta=1e-5)
    profile = combine_releases(layout, [release], schema=schema.source)
    inputs, outputs = schema_of(model)
    card = ModelCard(
        name="mlp",
        version=version,
        inputs=inputs,
        outputs=outputs,
        drift_reference=profile.to_json(),
    )
    recipients = [site.workspace.encryption_public_key, site.publisher_enc.public_key()]
    blob = create_bundle(model, card, site.publisher, recipients=recipients)
    site.sim.repo.publish(blob, publisher_key=site.publisher_enc)
    assert site.update()["installed"] == version


def schema_site(home: Path, model: bytes, schema: DataSchema = SCHEMA) -> Site:
    site = make_site(home, model)  # 1.0.0: a card without a schema
    publish_with_schema(site, "1.1.0", model, schema)
    return site


@pytest.fixture(scope="module")
def binary_model() -> bytes:
    coef = np.linspace(-2.0, 2.0, WIDTH).astype(np.float32)
    return linear_model(coef, 0.3)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, binary_model: bytes
) -> Iterator[tuple[RunningServer, Site]]:
    site = schema_site(tmp_path_factory.mktemp("records") / "site", binary_model)
    with running(site.workspace, dashboard=False) as srv:
        yield srv, site


@pytest.fixture
def client(served: tuple[RunningServer, Site]) -> Iterator[httpx.Client]:
    srv, _ = served
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        yield http


def sigmoid(x: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1 / (1 + np.exp(-x))
    return result


# -- refused, naming the column and the record ---------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"mean_area": 4000.0}, r"records\[1\]: column 'mean_area' = 4000 is outside its declared"),
        ({"mean_radius": 2}, r"records\[1\]: column 'mean_radius' = 2 is outside .*\[5, 30\]"),
        ({"site": "Z"}, r"records\[1\]: column 'site' = 'Z' is not one of its declared categ"),
        ({"sex": None}, r"records\[1\]: column 'sex' has no value"),
        ({"mean_area": None}, r"records\[1\]: column 'mean_area' has no value"),
        ({"mean_area": "648.2"}, r"records\[1\]: column 'mean_area' holds str '648.2'; send a n"),
        ({"sex": 1.5}, r"records\[1\]: column 'sex' holds float 1.5; send text"),
        ({"age": True}, r"records\[1\]: column 'age' holds bool True; send a number"),
        ({"age": 10**400}, r"records\[1\]: column 'age' holds a number too large for a float"),
        ({"sex": {"a": [1]}}, r"records\[1\]: column 'sex' holds dict \{'a': \[1\]\}; send text"),
    ],
)
def test_a_record_the_schema_does_not_allow_is_422_naming_column_and_record(
    client: httpx.Client, change: dict[str, Any], words: str
) -> None:
    response = client.post(PREDICT, json={"records": [RECORD, RECORD | change]})
    assert response.status_code == 422, response.text
    assert re.search(words, response.json()["detail"]), response.json()["detail"]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    changes=st.lists(
        st.dictionaries(st.sampled_from([*SCHEMA.features, "other"]), JSON_VALUES, max_size=3),
        min_size=1,
        max_size=4,
    )
)
def test_any_json_values_in_records_get_an_answer_or_a_422_never_a_5xx(
    served: tuple[RunningServer, Site], changes: list[dict[str, Any]]
) -> None:
    srv, _ = served
    body = {"records": [RECORD | change for change in changes]}
    response = httpx.post(srv.url + PREDICT, json=body, headers=srv.headers, timeout=30)
    assert response.status_code in {200, 422}, response.text
    if response.status_code == 422:
        assert "records[" in response.json()["detail"]


def test_a_record_without_a_column_is_refused_naming_it(client: httpx.Client) -> None:
    partial = {k: v for k, v in RECORD.items() if k != "mean_radius"}
    response = client.post(PREDICT, json={"records": [partial]})
    assert response.status_code == 422
    assert "records[0] has no column 'mean_radius'" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"records": []}, "non-empty array"),
        ({"records": {"mean_area": 1}}, "non-empty array"),
        ({"records": [1, 2]}, "records[0] is not an object"),
        ({"records": [RECORD], "inputs": [[0.0] * WIDTH]}, "not both"),
        ({"records": [RECORD] * 5000}, "5000 records; send 1 to 4096"),
    ],
)
def test_malformed_records_bodies_are_422(
    client: httpx.Client, body: dict[str, Any], words: str
) -> None:
    response = client.post(PREDICT, json=body)
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]


def test_attack_raw_values_sent_as_encoded_inputs_are_refused_not_answered(
    client: httpx.Client,
) -> None:
    # Before: a raw clinical row in the encoded form was answered with a logit of 1658.
    raw = [648.2, 14.1, 50.0, 0, 1, 0, 1, 0, 0, 1, 0]
    response = client.post(PREDICT, json={"inputs": [raw]})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "inputs[0]: input column 0 ('mean_area') = 648.2 is outside [0, 1]" in detail
    assert '"records"' in detail


def test_a_card_without_a_schema_refuses_records(site: Site) -> None:
    with (
        running(site.workspace, dashboard=False) as srv,
        httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http,
    ):
        response = http.post(PREDICT, json={"records": [RECORD]})
        encoded = http.post(PREDICT, json={"inputs": [[0.25] * 8]})
    assert response.status_code == 422
    assert "carries no data schema" in response.json()["detail"]
    assert set(encoded.json()) == {"model", "version", "outputs"}  # nothing added


# -- answered as the hand encoding is, with labels and probabilities -----------------------


def test_a_record_answers_as_its_hand_encoding_does(client: httpx.Client) -> None:
    records = [RECORD, RECORD | {"mean_area": 1500.0, "sex": "M", "site": "C", "age": 80}]
    by_hand = FeatureEncoder.for_schema(SCHEMA).encode(pd.DataFrame(records))
    answered = client.post(PREDICT, json={"records": records})
    encoded = client.post(PREDICT, json={"inputs": by_hand.tolist()})
    assert answered.status_code == encoded.status_code == 200, answered.text
    assert answered.json() == encoded.json()  # outputs, classes and predictions alike
    assert set(encoded.json()) == {"model", "version", "outputs", "task", "classes", "predictions"}


def test_records_are_generalized_as_the_training_data_was(client: httpx.Client) -> None:
    # age = "band:10": the model was trained on 50 for every age from 50 to 59.
    ages = [client.post(PREDICT, json={"records": [RECORD | {"age": a}]}).json() for a in (50, 57)]
    assert ages[0]["outputs"] == ages[1]["outputs"]
    sixty = client.post(PREDICT, json={"records": [RECORD | {"age": 60}]}).json()
    assert sixty["outputs"] != ages[0]["outputs"]


def test_binary_probabilities_are_the_sigmoid_of_the_logit(client: httpx.Client) -> None:
    rng = np.random.default_rng(4)
    records = [
        RECORD
        | {
            "mean_area": float(10 ** rng.uniform(0, 3.3)),
            "mean_radius": float(rng.uniform(5, 30)),
            "age": int(rng.integers(0, 100)),
            "sex": str(rng.choice(["F", "M"])),
            "site": str(rng.choice(["A", "B", "C"])),
        }
        for _ in range(40)
    ]
    doc = client.post(PREDICT, json={"records": records}).json()
    logits = np.asarray(doc["outputs"]["y"])[:, 0]
    assert doc["task"] == "binary"
    assert doc["classes"] == ["not malignant", "malignant"]
    probabilities = np.array([p["probabilities"] for p in doc["predictions"]])
    np.testing.assert_allclose(probabilities[:, 1], sigmoid(logits), rtol=1e-12)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    labels = [p["label"] for p in doc["predictions"]]
    assert labels == ["malignant" if x > 0 else "not malignant" for x in logits]
    assert {"malignant", "not malignant"} == set(labels)  # both sides of the boundary
    chosen = [p["probability"] for p in doc["predictions"]]
    np.testing.assert_allclose(chosen, probabilities.max(axis=1))


def test_multiclass_probabilities_are_the_softmax_of_the_logits(tmp_path: Path) -> None:
    schema = tumour_schema(positive=None)
    model = mlp([WIDTH, 8, 3], seed=2, scale=1.0)[0]
    site = schema_site(tmp_path / "site", model, schema)
    records = [RECORD | {"mean_area": float(a)} for a in np.linspace(0, 2500, 12)]
    with (
        running(site.workspace, dashboard=False) as srv,
        httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http,
    ):
        doc = http.post(PREDICT, json={"records": records}).json()
    logits = np.asarray(doc["outputs"]["y"])
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert doc["task"] == "multiclass"
    assert doc["classes"] == ["0", "1", "2"]
    got = np.array([p["probabilities"] for p in doc["predictions"]])
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert [p["label"] for p in doc["predictions"]] == [str(i) for i in logits.argmax(axis=1)]


def test_a_single_output_without_a_positive_class_is_a_value() -> None:
    answers = RecordSchema.of(tumour_schema(positive=None)).answers(np.array([[1.5], [-2.0]]))
    assert answers.task == "regression"
    assert answers.to_json() == [{"value": 1.5}, {"value": -2.0}]
    assert answers.labels == []
    np.testing.assert_array_equal(answers.columns()["value"], [1.5, -2.0])


def test_text_generalizations_apply_to_records_as_to_the_training_data() -> None:
    schema = DataSchema.from_dict(
        {
            "dataset": {"name": "visits", "label": "y", "positive": "1"},
            "features": {
                "categorical": ["visit", "zip"],
                "categories": {"visit": ["2019", "2020"], "zip": ["80", "81"]},
            },
            "treatment": {"generalize": {"visit": "year", "zip": "prefix:2"}},
            "consent": {"required": False, "legal_basis": "test"},
        }
    )
    described = RecordSchema.of(schema)
    raw = [{"visit": "2020-03-14", "zip": "8004"}, {"visit": "2019", "zip": 8123}]
    prepared = pd.DataFrame({"visit": ["2020", "2019"], "zip": ["80", "81"]})
    expected = FeatureEncoder.for_schema(schema).encode(prepared)
    np.testing.assert_array_equal(described.encode(raw), expected)
    with pytest.raises(InvalidInputError, match=r"row 2: column 'visit' = 'soon' is not a date"):
        described.encode([raw[0], {"visit": "soon", "zip": "8004"}])


def test_an_invalid_schema_in_a_card_is_named() -> None:
    card = ModelCard("mlp", "1.0.0", [], [], drift_reference={"schema": {"dataset": {}}})
    with pytest.raises(InvalidInputError, match=r"carries an invalid data schema \(no label"):
        RecordSchema.from_card(card)


# -- one encoding, with or without pandas ------------------------------------------------------

ADULT = DataSchema.load(builtin_schema("adult"))
ADULT_ENCODER = FeatureEncoder.for_schema(ADULT)


def _numeric(column: str) -> st.SearchStrategy[float]:
    low, high = ADULT.ranges[column]
    inside = st.floats(min_value=low, max_value=high)
    outside = st.floats(min_value=-2 * high, max_value=3 * high)  # clipped by both
    return st.one_of(
        inside, outside, st.integers(int(low), int(high)).map(float), st.just(math.nan)
    )


def _categorical(column: str) -> st.SearchStrategy[str | None]:
    known = st.sampled_from(ADULT_ENCODER.categories[column])
    return st.one_of(known, st.text(max_size=4), st.none())


@st.composite
def adult_columns(draw: st.DrawFn) -> dict[str, list[Any]]:
    rows = draw(st.integers(1, 12))
    columns: dict[str, list[Any]] = {}
    for column in ADULT.numeric:
        columns[column] = draw(st.lists(_numeric(column), min_size=rows, max_size=rows))
    for column in ADULT.categorical:
        columns[column] = draw(st.lists(_categorical(column), min_size=rows, max_size=rows))
    return columns


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(columns=adult_columns())
def test_encoding_columns_gives_the_matrix_of_encoding_a_frame(
    columns: dict[str, list[Any]],
) -> None:
    frame = pd.DataFrame(columns)
    expected = ADULT_ENCODER.encode(frame)
    as_arrays = ADULT_ENCODER.encode_columns({c: frame[c].to_numpy() for c in frame.columns})
    as_lists = ADULT_ENCODER.encode_columns(columns)
    np.testing.assert_array_equal(as_arrays, expected)
    np.testing.assert_array_equal(as_lists, expected)


def test_encoding_columns_of_the_adult_table_as_read_gives_the_same_matrix() -> None:
    frame = read_table(builtin_data("adult")).head(2000)  # every column read as text
    columns = {c: frame[c].to_numpy() for c in frame.columns}
    np.testing.assert_array_equal(
        ADULT_ENCODER.encode_columns(columns), ADULT_ENCODER.encode(frame)
    )
    records = [
        {str(c): float(v) if c in ADULT.numeric else v for c, v in row.items()}
        for row in frame.head(300).to_dict("records")
    ]
    by_records = ADULT_ENCODER.encode_columns(ADULT_ENCODER.columns_of(records))
    np.testing.assert_array_equal(by_records, ADULT_ENCODER.encode(frame.head(300)))


def test_records_are_served_without_pandas(served: tuple[RunningServer, Site]) -> None:
    _, site = served
    script = BLOCKER + (
        "import json, sys, urllib.request\n"
        "from insitu.serve import running\n"
        "from insitu.workspace import Workspace\n"
        "home, body = sys.argv[1], sys.argv[2].encode()\n"
        "with running(Workspace.open(home), dashboard=False) as srv:\n"
        "    headers = {**srv.headers, 'Content-Type': 'application/json'}\n"
        f"    request = urllib.request.Request(srv.url + {PREDICT!r}, data=body, headers=headers)\n"
        "    with urllib.request.urlopen(request, timeout=30) as response:\n"
        "        doc = json.loads(response.read())\n"
        "print(json.dumps({'doc': doc, 'pandas': 'pandas' in sys.modules}))\n"
    )
    body = json.dumps({"records": [RECORD]})
    proc = subprocess.run(
        [sys.executable, "-c", script, str(site.workspace.home), body],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shown["pandas"] is False
    assert shown["doc"]["predictions"][0]["label"] in {"malignant", "not malignant"}
    srv, _ = served
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        here = http.post(PREDICT, json={"records": [RECORD]}).json()
    assert shown["doc"] == here


# -- insitu predict: a row key, the raw output, label and probability ----------------------


def _predict(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, str]:
    code = run(["predict", "mlp", *args, "--home", str(home), "--json"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_predict_command_keeps_the_row_key_and_writes_labels(
    served: tuple[RunningServer, Site], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, site = served
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {
            "patient_id": [f"p-{i:04d}" for i in range(300)],
            "mean_area": rng.uniform(0, 2500, 300).round(1),
            "mean_radius": rng.uniform(5, 30, 300).round(2),
            "age": rng.integers(0, 100, 300),
            "sex": rng.choice(["F", "M"], 300),
            "site": rng.choice(["A", "B", "C"], 300),
            "diagnosis": "unknown",  # not a feature: never read
        }
    )
    frame.to_csv(tmp_path / "in.csv", index=False)
    code, out = _predict(
        capsys,
        site.workspace.home,
        str(tmp_path / "in.csv"),
        "-o",
        str(tmp_path / "out.parquet"),
        "--chunk-rows",
        "128",
    )
    assert code == 0, out
    summary = json.loads(out)
    assert (summary["rows"], summary["chunks"], summary["key"]) == (300, 3, "patient_id")
    written = pd.read_parquet(tmp_path / "out.parquet")
    assert list(written.columns) == [
        "patient_id",
        "y",
        "label",
        "probability",
        "probability_malignant",
    ]
    assert written["patient_id"].tolist() == frame["patient_id"].tolist()
    np.testing.assert_allclose(
        written["probability_malignant"], sigmoid(written["y"].to_numpy()), rtol=1e-6
    )
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        head = frame.head(5).to_dict("records")
        doc = http.post(PREDICT, json={"records": head}).json()
    np.testing.assert_allclose(
        written["y"].head(5), np.asarray(doc["outputs"]["y"])[:, 0], rtol=1e-6
    )
    assert written["label"].head(5).tolist() == [p["label"] for p in doc["predictions"]]


def test_predict_command_keys_by_row_number_without_an_identifier(
    served: tuple[RunningServer, Site], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, site = served
    pd.DataFrame([RECORD] * 3).drop(columns="patient_id").to_csv(tmp_path / "in.csv", index=False)
    code, out = _predict(
        capsys, site.workspace.home, str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.csv")
    )
    assert code == 0, out
    written = pd.read_csv(tmp_path / "out.csv")
    assert written["row"].tolist() == [1, 2, 3]
    assert set(written["label"]) <= {"malignant", "not malignant"}


def test_predict_command_stops_at_a_value_outside_the_schema_naming_row_and_column(
    served: tuple[RunningServer, Site], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, site = served
    rows = [RECORD] * 200
    rows[150] = RECORD | {"site": "Z"}
    pd.DataFrame(rows).to_csv(tmp_path / "in.csv", index=False)
    code, out = _predict(
        capsys,
        site.workspace.home,
        str(tmp_path / "in.csv"),
        "-o",
        str(tmp_path / "out.csv"),
        "--chunk-rows",
        "64",
    )
    assert code == 1
    assert "in.csv, row 151: column 'site' = 'Z' is not one of its declared categories" in out
    assert not (tmp_path / "out.csv").exists()


def test_predict_file_refuses_a_schema_other_than_the_cards(
    served: tuple[RunningServer, Site], tmp_path: Path
) -> None:
    _, site = served
    pd.DataFrame([RECORD]).to_csv(tmp_path / "in.csv", index=False)
    with (
        ModelRuntime.for_workspace(site.workspace, guard=False) as runtime,
        pytest.raises(SchemaError, match=r"not the one mlp 1.1.0 was trained with"),
    ):
        predict_file(
            runtime,
            "mlp",
            tmp_path / "in.csv",
            tmp_path / "out.csv",
            schema=tumour_schema(positive=None),
        )


# -- explanations of records ------------------------------------------------------------


@pytest.fixture(scope="module")
def explaining(
    tmp_path_factory: pytest.TempPathFactory, binary_model: bytes
) -> Iterator[httpx.Client]:
    site = schema_site(tmp_path_factory.mktemp("explain") / "site", binary_model)
    rng = np.random.default_rng(3)
    background = [
        RECORD
        | {
            "mean_area": float(rng.uniform(100, 2000)),
            "mean_radius": float(rng.uniform(6, 29)),
            "age": int(rng.integers(20, 90)),
            "sex": str(rng.choice(["F", "M"])),
            "site": str(rng.choice(["A", "B", "C"])),
        }
        for _ in range(24)
    ]
    encoded = FeatureEncoder.for_schema(SCHEMA).encode(pd.DataFrame(background))
    with (
        running(site.workspace, dashboard=False, backgrounds={"mlp": (encoded, None)}) as srv,
        httpx.Client(base_url=srv.url, headers=srv.headers, timeout=60) as http,
    ):
        yield http


def test_a_record_is_explained_as_its_encoding_is_with_shares_per_column(
    explaining: httpx.Client,
) -> None:
    records = [RECORD, RECORD | {"mean_area": 1500.0, "sex": "M", "site": "C", "age": 80}]
    by_hand = FeatureEncoder.for_schema(SCHEMA).encode(pd.DataFrame(records))
    answered = explaining.post("/v1/models/mlp/explain", json={"records": records})
    encoded = explaining.post("/v1/models/mlp/explain", json={"inputs": by_hand.tolist()})
    assert answered.status_code == encoded.status_code == 200, answered.text
    doc = answered.json()
    np.testing.assert_allclose(doc["attributions"], encoded.json()["attributions"], atol=1e-9)
    assert list(doc["by_column"]) == list(SCHEMA.features)
    shares = np.array([doc["by_column"][c] for c in SCHEMA.features]).T  # rows x columns
    # A column's encoded inputs add up to its share; the shares to the output (efficiency).
    np.testing.assert_allclose(shares.sum(axis=1), np.sum(doc["attributions"], axis=1))
    np.testing.assert_allclose(shares.sum(axis=1) + doc["base_value"], doc["outputs"], atol=1e-4)
    assert "by_column" not in encoded.json()  # encoded rows have no columns to sum by


def test_a_record_outside_the_schema_is_not_explained(explaining: httpx.Client) -> None:
    refused = explaining.post(
        "/v1/models/mlp/explain", json={"records": [RECORD | {"mean_area": 4000.0}]}
    )
    assert refused.status_code == 422
    assert "records[0]: column 'mean_area' = 4000 is outside" in refused.text
    too_many = explaining.post("/v1/models/mlp/explain", json={"records": [RECORD] * 17})
    assert too_many.status_code == 422
    assert "explanations take 1 to 16 per request" in too_many.text


def test_attributions_of_another_width_than_the_schema_are_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"3 attributions per row for 11 encoded inputs"):
        RecordSchema.of(SCHEMA).by_column(np.zeros((1, 3)))
