"""How both services serve HTTP: uvicorn's h11 protocol with a deadline on request heads.

uvicorn (0.54, the h11 and httptools protocols alike) arms no timer when a connection opens: its
only timer is the keep-alive one, armed after a response and cancelled by the first byte of the
next request. A connection that never sends a byte, or sends half a request head and stops,
stays open for as long as the peer likes, each one a file descriptor and a protocol object. Here
a connection has `header_timeout` seconds, from when it opens or its last response ended, to
send a complete request head; otherwise it is closed. The time the app then takes is the app's
business (the query API bounds it with its request timeout).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is overdue."""

    header_timeout: float = 5.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        # A new request-response cycle means a whole request head was parsed.
        if self.cycle is not cycle:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        # Armed before uvicorn handles a pipelined request, which then cancels it again.
        if not self.transport.is_closing():
            self._await_head()
        super().on_response_complete()

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            # DEBUG: a flood of idle connections would otherwise flood the log as well.
            log.debug("http_head_timeout", client=self.client, seconds=self.header_timeout)
            self.transport.close()


def server_config(app: Any, *, header_timeout: float, **options: Any) -> uvicorn.Config:
    """A `uvicorn.Config` for `app` whose connections must send a request head in time."""

    class Protocol(HeadTimeoutProtocol):
        pass

    Protocol.header_timeout = header_timeout
    return uvicorn.Config(
        app,
        http=Protocol,
        # Neither service serves WebSockets; without this an upgrade request would hand the
        # connection to a protocol without the head deadline.
        ws="none",
        log_config=None,
        access_log=False,
        **options,
    )
