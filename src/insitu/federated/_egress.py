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

In simulation the mod records the entry itself (one process). A deployed site's mod
runs in Flower's ``flwr-clientapp`` process, a fresh one per message, while the site's
own process watches the run: the mod only *spools* its entry, one small JSON file per
reply written atomically into ``federation/egress-spool/`` of the site's workspace
(:func:`deployed_egress_mod`), and the site process, the one writer of these entries,
records them (:class:`EgressSpool`): record, then delete, each entry carrying its spool
file's name, so a crash between the two never records a reply twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu._atomic import atomic_create_bytes
from insitu.audit import events
from insitu.errors import InvalidEventError
from insitu.federated._plan import SharedPlan, SiteSetup
from insitu.workspace import Workspace

__all__ = [
    "EGRESS_EVENT",
    "KINDS",
    "EgressSite",
    "EgressSpool",
    "classify_reply",
    "deployed_egress_mod",
    "egress_mod",
    "metrics_sent",
    "spool_dir",
    "spool_entry",
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


def egress_mod(
    site_of: Callable[[Any], EgressSite], *, spool: bool = False
) -> Callable[[Any, Any, Any], Any]:
    """A client mod recording each reply in the site's ledger; put it first in ``mods``.

    With ``spool`` it writes each entry to the site's egress spool instead, for the
    site's own process to record (see the module docstring).
    """

    def mod(message: Any, context: Any, call_next: Any) -> Any:
        from flwr.common.serde import message_to_proto

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
        payload = {
            "run": where.run_id,
            "site": where.site,
            "round": int(group) if group.isdigit() else None,
            "message": str(message.metadata.message_type),
            "stage": stage or None,
            "bytes_in": bytes_in,
            "bytes_out": kinds.pop("total"),
            "metrics_sent": metrics_sent(reply),
            **{f"{kind}_bytes": value for kind, value in kinds.items()},
        }
        if spool:
            spool_entry(where.home, payload)
        else:
            with Workspace.open(where.home).ledger() as ledger:
                events.FEDERATION_EGRESS.record(ledger, **payload)
        return reply

    return mod


# --------------------------------------------------------------------------- the spool


def spool_dir(home: Path) -> Path:
    """Where a deployed site's ClientApps spool their egress entries."""
    return Workspace.layout(home).federation_dir / "egress-spool"


def spool_entry(home: Path, payload: dict[str, Any]) -> Path:
    """Write one ``federation.egress`` payload into the site's spool, atomically.

    The payload is checked first (a bad one raises here, in the ClientApp, before the
    reply leaves). Names sort by time and never collide (nanoseconds, pid, random).

    Raises:
        InvalidEventError: the payload does not fit ``federation.egress``.

    """
    events.FEDERATION_EGRESS.check(payload)
    directory = spool_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.json"
    data = json.dumps(payload, sort_keys=True).encode("utf-8") + b"\n"
    if not atomic_create_bytes(path, data, mode=0o600):
        raise FileExistsError(path)
    return path


def _deployed_site(context: Any) -> EgressSite:
    """The site and run of a deployed ClientApp's message (its node and run config)."""
    home = Path(str(context.node_config["insitu-home"]))
    run = SharedPlan.loads(str(context.run_config["insitu"]))
    return EgressSite(home=home, run_id=run.run_id, site=SiteSetup.read(home).site)


#: The egress mod of a deployed site's ClientApp (``insitu._flower_app``): it spools.
deployed_egress_mod = egress_mod(_deployed_site, spool=True)


class EgressSpool:
    """The site process's side of the spool: each file recorded once, then deleted.

    Each entry carries its file's name (``spool``); names already in the ledger (a
    crash after recording, before deleting) are deleted without recording again. A
    file that is not a ``federation.egress`` payload is renamed ``*.rejected`` and
    logged, never recorded.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.directory = spool_dir(home)
        self._recorded: set[str] | None = None

    def pending(self) -> list[Path]:
        """The spooled files not yet recorded and deleted, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(
            p
            for p in self.directory.iterdir()
            if p.suffix == ".json" and not p.name.startswith(".")
        )

    def ingest(self) -> list[str]:
        """Record every pending file in the site's ledger; the runs they name."""
        files = self.pending()
        if not files:
            return []
        runs: list[str] = []
        with Workspace.open(self.home).ledger() as ledger:
            if self._recorded is None:
                self._recorded = {
                    str(e.payload["spool"])
                    for e in ledger.entries(event_type=EGRESS_EVENT)
                    if "spool" in e.payload
                }
            for path in files:
                if path.name not in self._recorded:
                    try:
                        payload = json.loads(path.read_bytes())
                        if not isinstance(payload, dict) or "spool" in payload:
                            raise InvalidEventError("not a federation.egress payload")
                        events.FEDERATION_EGRESS.record(ledger, **payload, spool=path.name)
                    except (OSError, ValueError, InvalidEventError) as exc:
                        _set_aside(path, exc)
                        continue
                    self._recorded.add(path.name)
                    if payload["run"] not in runs:
                        runs.append(payload["run"])
                path.unlink(missing_ok=True)
        return runs


def _set_aside(path: Path, exc: Exception) -> None:
    """Keep a spool file that is not an egress payload as ``*.rejected``, and say so."""
    rejected = path.with_suffix(".rejected")
    with contextlib.suppress(OSError):  # gone already: nothing to keep
        path.replace(rejected)
    logger.warning("egress spool file %s is not recorded (%s); kept as %s", path, exc, rejected)
