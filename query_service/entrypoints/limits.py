"""Limits on the HTTP API, so a flood of slow requests cannot hold the process.

Together with uvicorn's `limit_concurrency` (requests beyond it get 503 at once, see
`query_service/__main__.py`) and the page-size cap of every list route, this bounds the work
and the memory one replica takes on.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

TIMEOUT_BODY = json.dumps({"detail": "the request took too long; try again"}).encode()


class RequestTimeout:
    """Answers 503 (with `Retry-After`) to a request not answered within `seconds`.

    The request's task is cancelled, which ends its database calls. A response that already
    started is cut instead (its status line is gone).
    """

    def __init__(self, app: ASGIApp, *, seconds: float) -> None:
        self._app = app
        self._seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            async with asyncio.timeout(self._seconds) as deadline:
                await self._app(scope, receive, send_tracked)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(TIMEOUT_BODY)).encode()),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": TIMEOUT_BODY})
