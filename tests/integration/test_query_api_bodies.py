"""Request bodies are bounded before anything reads them, the token check included: a body above
`CQRS_HTTP_MAX_BODY_BYTES` is a 413, by its `Content-Length` at once, a chunked one as soon as
it passes the limit. Against `python -m query_service` on a real socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import Services
from tests.query_support import RunningApi, query_api_process

pytestmark = pytest.mark.integration

TOKEN = "body-limit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 2**20
WHOEVER = [pytest.param({}, id="no-token"), pytest.param(AUTH, id="token")]


@pytest.fixture
async def api(services: Services, broker: str, mongo_db: str) -> AsyncIterator[RunningApi]:
    settings = {
        "CQRS_AMQP_URL": broker,
        "CQRS_MONGO_URL": services.mongo_url,
        "CQRS_MONGO_DB": mongo_db,
        "CQRS_API_TOKEN": TOKEN,
    }
    async with query_api_process(settings) as running:
        yield running


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.json() == {
        "detail": "the request body is larger than 16384 bytes",
        "reason": "body_too_large",
    }


@pytest.mark.parametrize("headers", WHOEVER)
async def test_a_large_body_is_refused_whoever_sends_it(
    api: RunningApi, headers: dict[str, str]
) -> None:
    body = b'{"read_models": ["' + b"a" * MIB + b'"]}'
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        response = await http.post(
            "/admin/rebuilds",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
        )
        assert_too_large(response)
        assert (await http.get("/healthz")).status_code == 200


@pytest.mark.parametrize("headers", WHOEVER)
async def test_a_large_chunked_body_is_refused_whoever_sends_it(
    api: RunningApi, headers: dict[str, str]
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"x" * (MIB // 16)

    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        response = await http.post(
            "/admin/rebuilds",
            content=chunks(),
            headers={**headers, "Content-Type": "application/json"},
        )
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert_too_large(response)


async def _status_line(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return head.split(b"\r\n", 1)[0], time.monotonic() - started


async def test_a_declared_length_above_the_limit_is_refused_before_the_body_comes(
    api: RunningApi,
) -> None:
    reader, writer = await asyncio.open_connection(api.host, api.port)
    try:
        writer.write(
            b"POST /admin/rebuilds HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {MIB}\r\n\r\n".encode()
        )
        status, took = await _status_line(reader)  # not one byte of the body sent
    finally:
        writer.close()

    assert status.startswith(b"HTTP/1.1 413 ")
    assert took < 1


async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(api: RunningApi) -> None:
    reader, writer = await asyncio.open_connection(api.host, api.port)
    chunk = b"x" * 20_000
    try:
        writer.write(
            b"POST /admin/rebuilds HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        )
        status, took = await _status_line(reader)  # the body has not ended
    finally:
        writer.close()

    assert status.startswith(b"HTTP/1.1 413 ")
    assert took < 1


async def test_a_normal_rebuild_request_still_works(api: RunningApi) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        refused = await http.post("/admin/rebuilds", json={"read_models": ["accounts"]})
        started = await http.post(
            "/admin/rebuilds", json={"read_models": ["accounts"]}, headers=AUTH
        )

    assert refused.status_code == 401
    assert started.status_code == 202, started.text
    assert started.json()["read_models"] == ["accounts"]
