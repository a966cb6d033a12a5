"""What crosses a site's boundary: every reply a site sends, measured and classified.

A Flower client *mod* (the outermost one, so it sees what actually leaves, after
SecAgg+ has masked the update) serializes each reply with Flower's own protobuf
encoding (``flwr.common.serde``), the bytes a deployment puts on the wire, and
classifies every record of it:

* ``model_update``: parameter arrays (``ArrayRecord``), or the SecAgg+ masked vector
  (``secaggplus_configs.masked_params``): the only thing derived from the site's data;
* ``protocol``: the rest of SecAgg+ (public keys, encrypted key shares, node lists);
* ``metrics``: scalar figures (counts, loss, accuracy, epsilon, a digest, the site
  name): numbers and strings of at most :data:`MAX_METRIC_CHARS` characters;
* ``envelope``: the message's metadata (ids, type, round) and protobuf framing;
* ``unclassified``: anything else: bytes or lists outside SecAgg+, long strings. This
  is where raw records would show if a client app leaked them; it must be zero.

Each reply is one ``federation.egress`` entry in the *site's* ledger (the site is the
witness of its own boundary): run, round, message type, SecAgg+ stage, bytes in and
out, bytes by kind, and every metric it sent with its value (``metrics_sent``: names
and numbers, never arrays), so that what a site released can be read back, figure by
figure. The compliance report (``insitu.report``) sums them per site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu.audit import events

__all__ = [
    "EGRESS_EVENT",
    "KINDS",
    "EgressSite",
    "classify_reply",
    "egress_mod",
    "metrics_sent",
]

logger = logging.getLogger(__name__)

EGRESS_EVENT = events.FEDERATION_EGRESS.name
KINDS = ("model_update", "protocol", "metrics", "envelope", "unclassified")
MAX_METRIC_CHARS = 64
_SECAGG_CONFIGS = "secaggplus_configs"
_SECAGG_UPDATE = {"masked_params"}
_SECAGG_PROTOCOL = {"pk1", "pk2", "dsts", "ctxts", "srcs", "nids", "shares", "active_nids"}


@dataclass(frozen=True)
class EgressSite:
    """Where a site's egress is recorded: its workspace, the run and its name."""

    home: Path
    run_id: str
    site: str


def _proto_size(name: str, record: Any) -> int:
    from flwr.common import RecordDict
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(RecordDict({name: record})).ByteSize())


def _is_metric(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    return isinstance(value, str) and len(value) <= MAX_METRIC_CHARS


def metrics_sent(message: Any) -> dict[str, Any]:
    """Every metric of a reply (``record.key`` -> value), SecAgg+'s protocol excluded."""
    from flwr.common import ConfigRecord, MetricRecord

    if not message.has_content():
        return {}
    sent: dict[str, Any] = {}
    for name, record in message.content.items():
        if not isinstance(record, ConfigRecord | MetricRecord) or name == _SECAGG_CONFIGS:
            continue
        for key, value in record.items():
            if _is_metric(value):
                sent[f"{name}.{key}"] = value
    return sent


def classify_reply(message: Any) -> dict[str, int]:
    """Bytes of a Flower reply by kind (see the module docstring); they sum to its size."""
    from flwr.common import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.common.serde import message_to_proto

    total = int(message_to_proto(message).ByteSize())
    kinds = dict.fromkeys(KINDS, 0)
    content = message.content if message.has_content() else None
    records = list(content.items()) if content is not None else []
    for name, record in records:
        if isinstance(record, ArrayRecord):
            kinds["model_update"] += _proto_size(name, record)
            continue
        if not isinstance(record, ConfigRecord | MetricRecord):
            kinds["unclassified"] += _proto_size(name, record)
            continue
        groups: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        for key, value in record.items():
            if name == _SECAGG_CONFIGS and key in _SECAGG_UPDATE:
                groups["model_update"][key] = value
            elif name == _SECAGG_CONFIGS and key in _SECAGG_PROTOCOL:
                groups["protocol"][key] = value
            elif _is_metric(value):
                groups["metrics"][key] = value
            else:
                groups["unclassified"][key] = value
        kind_of_type = ConfigRecord if isinstance(record, ConfigRecord) else MetricRecord
        for kind, values in groups.items():
            if values:
                kinds[kind] += _proto_size(name, kind_of_type(values))
    # Message metadata, plus the framing that splitting records apart does not count.
    kinds["envelope"] = max(0, total - sum(kinds.values()))
    kinds["total"] = total
    return kinds


def egress_mod(site_of: Callable[[Any], EgressSite]) -> Callable[[Any, Any, Any], Any]:
    """A client mod recording each reply in the site's ledger; put it first in ``mods``."""

    def mod(message: Any, context: Any, call_next: Any) -> Any:
        from flwr.common.serde import message_to_proto

        from insitu.workspace import Workspace

        # Read before the call: SecAgg+ consumes the stage from the incoming message.
        configs = (
            message.content.config_records.get(_SECAGG_CONFIGS) if message.has_content() else None
        )
        stage = str(configs.get("stage", "")) if configs is not None else ""
        bytes_in = int(message_to_proto(message).ByteSize())
        reply = call_next(message, context)
        kinds = classify_reply(reply)
        where = site_of(context)
        group = str(message.metadata.group_id)
        with Workspace.open(where.home).ledger() as ledger:
            events.FEDERATION_EGRESS.record(
                ledger,
                run=where.run_id,
                site=where.site,
                round=int(group) if group.isdigit() else None,
                message=str(message.metadata.message_type),
                stage=stage or None,
                bytes_in=bytes_in,
                bytes_out=kinds.pop("total"),
                metrics_sent=metrics_sent(reply),
                **{f"{kind}_bytes": value for kind, value in kinds.items()},
            )
        return reply

    return mod
