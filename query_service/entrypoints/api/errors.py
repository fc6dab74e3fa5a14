"""What the API answers when it cannot answer with data: the error bodies, their OpenAPI
descriptions, and the handlers that turn the service's exceptions into them."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from query_service.entrypoints.api.limits import UnavailableError

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

STORE_UNAVAILABLE = "read store unavailable"


class ErrorDetail(BaseModel):
    """The body of an error response."""

    detail: str


class Refusal(BaseModel):
    """The body of a refusal the client may retry (503, with `Retry-After`) or must change (413).

    `reason` is a code a client can act on; `detail` says it in words.
    """

    detail: str
    reason: str


class NotCaughtUp(BaseModel):
    """504: the read model has not reached what the query asked for within the wait."""

    detail: str
    required: dict[str, int | None]
    current: dict[str, int | None] | None


class NotCaughtUpError(Exception):
    """A read asked for a version or position the read model has not reached in time."""

    def __init__(
        self,
        what: str,
        required: dict[str, int | None],
        current: dict[str, int | None] | None,
        waited_seconds: float,
    ) -> None:
        super().__init__(what)
        self.what = what
        self.required = required
        self.current = current
        self.waited_seconds = waited_seconds


Responses = dict[int | str, dict[str, Any]]
UNAVAILABLE: Responses = {
    503: {
        "model": Refusal,
        "description": "try again after `Retry-After`: `store_unavailable`, `overloaded`, "
        "`request_timeout`, `too_many_waiting_reads`",
    }
}

NOT_FOUND: Responses = {404: {"model": ErrorDetail}, **UNAVAILABLE}

FRESHNESS: Responses = {**NOT_FOUND, 504: {"model": NotCaughtUp}}


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # A MongoDB outage is the client's cue to retry, not a bug: 503 rather than 500.
    log.warning("read_store_unavailable", path=request.url.path, error=repr(exc))
    return JSONResponse(
        status_code=503,
        content=Refusal(detail=STORE_UNAVAILABLE, reason="store_unavailable").model_dump(),
        headers={"Retry-After": "1"},
    )


async def not_caught_up(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotCaughtUpError)
    body = NotCaughtUp(
        detail=f"{exc.what} has not reached the requested version/position within "
        f"{exc.waited_seconds}s; the projection is behind, retry later",
        required=exc.required,
        current=exc.current,
    )
    return JSONResponse(
        status_code=504, content=body.model_dump(mode="json"), headers={"Retry-After": "1"}
    )


async def unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnavailableError)
    body = Refusal(detail=exc.detail, reason=exc.reason)
    return JSONResponse(status_code=503, content=body.model_dump(), headers={"Retry-After": "1"})
