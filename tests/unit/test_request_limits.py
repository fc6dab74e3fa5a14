"""The API's request limits: a slow request gets 503 and the process goes on answering; each
limit takes its value from the settings."""

from __future__ import annotations

import asyncio
from typing import cast

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from query_service.entrypoints.api.app import create_app
from query_service.entrypoints.api.limits import BodyLimit, InFlightLimit, RequestTimeout
from query_service.settings import QueryServiceSettings


def slow_app(seconds: float) -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    finished: list[str] = []
    app.add_middleware(RequestTimeout, seconds=seconds)

    @app.get("/slow")
    async def slow(wait: float) -> dict[str, str]:
        await asyncio.sleep(wait)
        finished.append("slow")
        return {"ok": "slow"}

    @app.get("/fails")
    async def fails() -> dict[str, str]:
        raise TimeoutError("a timeout of the handler's own, not the request's")

    return app, finished


async def test_a_request_over_the_limit_gets_503_and_is_cancelled() -> None:
    app, finished = slow_app(0.2)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        response = await http.get("/slow", params={"wait": 5})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json() == {
            "detail": "the request took too long; try again",
            "reason": "request_timeout",
        }
        fast = await http.get("/slow", params={"wait": 0})
        assert fast.status_code == 200
    await asyncio.sleep(0.1)
    assert finished == ["slow"]  # only the fast one ran to its end


async def test_a_timeout_raised_by_the_handler_itself_is_not_reported_as_the_limit() -> None:
    app, _ = slow_app(5.0)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        response = await http.get("/fails")
    assert response.status_code == 500


def test_the_query_api_applies_the_limits_of_its_settings() -> None:
    settings = QueryServiceSettings(
        http_request_timeout_seconds=12.5,
        http_max_concurrency=7,
        http_max_body_bytes=1000,
        read_wait_max_waiters=3,
    )
    app = create_app(settings)

    def applied(middleware: type[object], name: str) -> list[object]:
        return [m.kwargs[name] for m in app.user_middleware if m.cls is cast(object, middleware)]

    assert applied(RequestTimeout, "seconds") == [12.5]
    assert applied(InFlightLimit, "limit") == [7]
    assert applied(BodyLimit, "max_bytes") == [1000]
    assert app.state.read_waits.limit == 3


def test_a_request_timeout_shorter_than_the_read_wait_is_refused() -> None:
    with pytest.raises(ValidationError, match="must exceed CQRS_READ_WAIT_SECONDS"):
        QueryServiceSettings(http_request_timeout_seconds=5, read_wait_seconds=5)


def test_waiting_reads_may_not_take_every_request_slot() -> None:
    with pytest.raises(ValidationError, match="must be below CQRS_HTTP_MAX_CONCURRENCY"):
        QueryServiceSettings(http_max_concurrency=10, read_wait_max_waiters=10)
