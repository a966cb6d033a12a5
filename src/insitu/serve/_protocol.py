"""The HTTP protocol of uvicorn with a deadline for each request head (slowloris).

uvicorn 0.49 times out neither a connection that never sends a request nor one that
sends its request line and headers a byte at a time: its only timer, the keep-alive,
starts after a response and any byte received cancels it. Nor does it stop draining
the unread body of a request answered early (401, 413): each byte of it cancels that
timer again. A few hundred such connections would hold the server's sockets forever.

:func:`head_deadline_protocol` gives the protocol uvicorn would pick (httptools when
installed, else h11) with one more timer: from the moment a connection opens, and again
when each response is complete, the client has ``timeout`` seconds to complete its next
request head, else the connection is closed. Once a request is being served the app's
own deadline applies to its body (:func:`insitu.serve._codec.read_body`, 408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

__all__ = ["head_deadline_protocol"]

logger = logging.getLogger(__name__)


def head_deadline_protocol(timeout: float) -> type[asyncio.Protocol]:
    """The HTTP protocol class uvicorn would use, closing connections whose head is late."""

    class HeadDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(timeout, self._head_overdue)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_overdue(self) -> None:
            self._head_timer = None
            cycle = self.cycle
            # A request being served is the app's business; its response re-arms the timer.
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                logger.info(
                    "closing a connection that sent no complete request head in %g s", timeout
                )
                self.transport.close()

    return HeadDeadlineProtocol
