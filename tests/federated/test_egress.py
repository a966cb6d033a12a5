"""The egress classifier: every byte of a reply is accounted for, and leaked records show."""

from __future__ import annotations

import numpy as np
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.common import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from insitu.federated._egress import classify_reply


def _reply(content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=7,
        dst_node_id=1,
        reply_to_message_id="m1",
        group_id="3",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return make_message(metadata, content)


def _update() -> RecordDict:
    return RecordDict(
        {
            "fitres.parameters": ArrayRecord(
                [np.zeros((1, 104), np.float32), np.zeros(1, np.float32)]
            ),
            "fitres.metrics": ConfigRecord({"site": "site-01", "epsilon": 1.2, "loss": 0.4}),
            "fitres.num_examples": MetricRecord({"num_examples": 800}),
        }
    )


def test_an_honest_update_has_no_unclassified_bytes():
    kinds = classify_reply(_reply(_update()))
    assert kinds["unclassified"] == 0
    assert kinds["model_update"] > 104 * 4
    assert sum(v for k, v in kinds.items() if k != "total") == kinds["total"]


def test_records_smuggled_in_a_reply_are_unclassified_bytes():
    leaked = _update()
    rows = np.random.default_rng(0).random((50, 14)).astype(np.float32)
    leaked["fitres.metrics"]["rows"] = rows.tobytes()  # raw records as bytes in the metrics
    kinds = classify_reply(_reply(leaked))
    assert kinds["unclassified"] >= rows.nbytes


def test_a_long_string_is_not_a_metric():
    leaked = _update()
    leaked["fitres.metrics"]["note"] = "age=39,sex=Male,country=United-States;" * 10
    assert classify_reply(_reply(leaked))["unclassified"] > 300
