"""The Flower app of a deployed federation, kept light: heavy imports wait for the work.

Flower's deployment engine starts a fresh ``flwr-clientapp`` process for every message a
site receives; with SecAgg+ a round is five messages per site, and only one of them
(training) and the evaluation need PyTorch. This module imports nothing but Flower and
:mod:`insitu`'s root; the work itself is in :mod:`insitu.federated._apps`. The egress
witness (outermost mod, every message) imports :mod:`insitu.federated`, whose names load
on first use: the witness costs the ledger's modules (about 50 ms), not PyTorch.

It lives outside :mod:`insitu.federated`, whose package import loads the simulation
engine and PyTorch.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.client import ClientApp
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Context, Message
from flwr.server import Grid, ServerApp

__all__ = ["client_app", "server_app"]

server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from insitu.federated import run_server_app

    run_server_app(grid, context)


def _client_fn(context: Context) -> Any:
    from insitu.federated import site_client

    return site_client(context)


def _egress(msg: Message, context: Context, call_next: Any) -> Message:
    """Spool what the reply carries out of the site, for the site's ledger (outermost).

    The site's own process records the spooled entries (``federation.egress``): Flower
    starts this process per message while the site's process watches the run.
    """
    from insitu.federated import deployed_egress_mod

    result: Message = deployed_egress_mod(msg, context, call_next)
    return result


def _privacy_mods(msg: Message, context: Context, call_next: Any) -> Message:
    """The run's mods, chosen by its settings: SecAgg+ outside, site clipping inside."""
    config = json.loads(str(context.run_config["insitu"]))["config"]
    chain = call_next
    if config["privacy"] == "site":
        inner = chain

        def clipped(m: Message, c: Context) -> Message:
            return fixedclipping_mod(m, c, inner)

        chain = clipped
    if config["secure_aggregation"]:
        return secaggplus_mod(msg, context, chain)
    result: Message = chain(msg, context)
    return result


# The egress witness is outermost: it measures what leaves the site, after SecAgg+.
client_app = ClientApp(client_fn=_client_fn, mods=[_egress, _privacy_mods])
