"""Limits on the HTTP API, so no flood of requests can hold the process or starve its probes.

From the outside in (see `create_app`):

- `BodyLimit`: a request body above `CQRS_HTTP_MAX_BODY_BYTES` is refused with 413 before any
  route, token check or parser sees it; by its `Content-Length` at once, a chunked one as soon as
  the count passes the limit.
- `InFlightLimit`: at most `CQRS_HTTP_MAX_CONCURRENCY` requests are served at once; beyond it, 503
  at once. Requests are counted, not connections, and the probes are never refused, so idle
  connections cannot make `/healthz` fail (the server closes those: `cqrs_runtime.http_server`).
- `RequestTimeout`: a request not answered in time gets 503 and is cancelled.
- `ReadWaits`: reads waiting for `min_version` / `min_position` have a limit of their own
  (`CQRS_READ_WAIT_MAX_WAITERS`), so they cannot take every slot from ordinary reads.

Every refusal answers `{"detail": ..., "reason": <code>}`; a 503 carries `Retry-After`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_service.metrics import QueryMetrics

# Reason codes of the refusals, in the body and as the label of `cqrs_http_refused_total`.
BODY_TOO_LARGE = "body_too_large"
OVERLOADED = "overloaded"
REQUEST_TIMEOUT = "request_timeout"
TOO_MANY_WAITING_READS = "too_many_waiting_reads"

# Liveness, readiness and metrics: an orchestrator must reach them however busy the API is.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def refusal_body(detail: str, reason: str) -> bytes:
    return json.dumps({"detail": detail, "reason": reason}).encode()


async def refuse(send: Send, status: int, detail: str, reason: str) -> None:
    """Answer the request with `status` and a reason code; a 503 says when to come back."""
    body = refusal_body(detail, reason)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _count(prometheus: QueryMetrics | None, reason: str) -> None:
    if prometheus is not None:
        prometheus.http_refused.labels(reason).inc()


class BodyLimit:
    """Refuses a request body above `max_bytes` with 413, whoever sends it.

    A declared `Content-Length` above the limit is refused before the app runs. A body without
    one is counted as the app reads it: past the limit the 413 is sent, the app is told the
    client went away, and whatever the app answers then is dropped. Nothing past the limit is
    handed on, so nothing large is buffered; the server discards the rest of the body as it
    arrives (and closes a connection still sending after its header timeout).
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, prometheus: QueryMetrics | None = None
    ) -> None:
        self._app = app
        self._max = max_bytes
        self._prometheus = prometheus

    def _detail(self) -> str:
        return f"the request body is larger than {self._max} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self._max:
            _count(self._prometheus, BODY_TOO_LARGE)
            await refuse(send, 413, self._detail(), BODY_TOO_LARGE)
            return
        received = 0
        refused = False

        async def receive_counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max:
                    refused = True
                    _count(self._prometheus, BODY_TOO_LARGE)
                    await refuse(send, 413, self._detail(), BODY_TOO_LARGE)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self._app(scope, receive_counted, send_unless_refused)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class InFlightLimit:
    """Answers 503 (with `Retry-After`) at once to a request beyond `limit` being served.

    Requests in flight are counted, not connections: a connection that sends nothing costs no
    slot. The probes (`PROBE_PATHS`) are neither counted nor refused.
    """

    def __init__(self, app: ASGIApp, *, limit: int, prometheus: QueryMetrics | None = None) -> None:
        self._app = app
        self._limit = limit
        self._prometheus = prometheus
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self._app(scope, receive, send)
            return
        if self.in_flight >= self._limit:
            _count(self._prometheus, OVERLOADED)
            await refuse(
                send,
                503,
                f"this replica is serving {self._limit} requests already; try again",
                OVERLOADED,
            )
            return
        self._moved(+1)
        try:
            await self._app(scope, receive, send)
        finally:
            self._moved(-1)

    def _moved(self, by: int) -> None:
        self.in_flight += by
        if self._prometheus is not None:
            self._prometheus.http_requests_in_flight.set(self.in_flight)


class RequestTimeout:
    """Answers 503 (with `Retry-After`) to a request not answered within `seconds`.

    The request's task is cancelled, which ends its database calls. A response that already
    started is cut instead (its status line is gone).
    """

    def __init__(
        self, app: ASGIApp, *, seconds: float, prometheus: QueryMetrics | None = None
    ) -> None:
        self._app = app
        self._seconds = seconds
        self._prometheus = prometheus

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
            _count(self._prometheus, REQUEST_TIMEOUT)
            await refuse(send, 503, "the request took too long; try again", REQUEST_TIMEOUT)


class UnavailableError(Exception):
    """Answered 503 with `Retry-After` and a reason code (the cause is logged, not sent)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TooManyWaitingReadsError(UnavailableError):
    """A read would wait for its version while `limit` reads wait already."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            TOO_MANY_WAITING_READS,
            f"{limit} reads are waiting for their version already; try again",
        )
        self.limit = limit


class ReadWaits:
    """Counts the reads waiting for `min_version` / `min_position`; refuses one beyond `limit`.

    Such a read holds its request slot and polls MongoDB until its version arrives or
    `CQRS_READ_WAIT_SECONDS` pass; the limit keeps reads for versions that never come from
    taking every slot (and the database's time) from everything else.
    """

    def __init__(self, limit: int, *, prometheus: QueryMetrics | None = None) -> None:
        self.limit = limit
        self.waiting = 0
        self._prometheus = prometheus

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Held while one read waits; raises `TooManyWaitingReadsError` when none is free."""
        if self.waiting >= self.limit:
            _count(self._prometheus, TOO_MANY_WAITING_READS)
            raise TooManyWaitingReadsError(self.limit)
        self._moved(+1)
        try:
            yield
        finally:
            self._moved(-1)

    def _moved(self, by: int) -> None:
        self.waiting += by
        if self._prometheus is not None:
            self._prometheus.read_waits.set(self.waiting)
