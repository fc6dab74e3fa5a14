"""Every HTTP request timed into `cqrs_http_request_seconds`, by route template."""

from __future__ import annotations

import time

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_service.metrics import UNMATCHED_ROUTE, QueryMetrics

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestTimer:
    """ASGI middleware: times each HTTP request into `cqrs_http_request_seconds`.

    The `route` label is the matched route's template (`/accounts/{account_id}`), never the raw
    path, so the number of series stays bounded whatever clients send.
    """

    def __init__(self, app: ASGIApp, *, prometheus: QueryMetrics) -> None:
        self._app = app
        self._histogram = prometheus.http_request_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app starts a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_with_status)
        finally:
            route: BaseRoute | None = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self._histogram.labels(method, template, str(status)).observe(
                time.perf_counter() - started
            )
