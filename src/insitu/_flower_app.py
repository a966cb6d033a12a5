"""The Flower app of a deployed federation, kept light: heavy imports wait for the work.

Flower's deployment engine starts a fresh ``flwr-clientapp`` process for every message a
site receives; with SecAgg+ a round is five messages per site, and only one of them
(training) and the evaluation need PyTorch. This module imports nothing but Flower and
:mod:`insitu`'s root, so the key-agreement and unmasking stages do not pay for importing
PyTorch. The work itself is in :mod:`insitu.federated._apps`.

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


client_app = ClientApp(client_fn=_client_fn, mods=[_privacy_mods])
