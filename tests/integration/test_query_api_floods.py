"""The query API under floods, served as in production (`python -m query_service`, uvicorn on a
real socket, a real MongoDB server behind): idle connections and reads waiting for a version
that never comes must not starve the probes or an ordinary read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from uuid import uuid4

import httpx
import pytest

from query_service.adapters.mongo import create_client
from tests.conftest import Services
from tests.metrics_support import scrape, value
from tests.query_support import RunningApi, eventually, opened_account, query_api_process
from tests.read_model_support import replay_one_by_one

pytestmark = pytest.mark.integration

ACCOUNT = uuid4()
# What a liveness probe or an ordinary read must stay under, whatever else is going on.
PROMPT_SECONDS = 1.0

Launch = Callable[..., Awaitable[RunningApi]]


@pytest.fixture
async def launch(services: Services, mongo_db: str) -> AsyncIterator[Launch]:
    """Starts query APIs with extra `CQRS_*` settings over a database holding one account."""
    client = create_client(services.mongo_url)
    try:
        await replay_one_by_one(client[mongo_db], opened_account(ACCOUNT, deposit=10))
    finally:
        await client.close()
    async with AsyncExitStack() as stack:

        async def start(**settings: str) -> RunningApi:
            return await stack.enter_async_context(
                query_api_process(
                    {
                        "CQRS_AMQP_URL": services.amqp_url,
                        "CQRS_MONGO_URL": services.mongo_url,
                        "CQRS_MONGO_DB": mongo_db,
                        **settings,
                    }
                )
            )

        yield start


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


@asynccontextmanager
async def idle_connections(api: RunningApi, count: int) -> AsyncIterator[None]:
    """`count` TCP connections to the API that never send a byte."""
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            _, writer = await asyncio.open_connection(api.host, api.port)
            writers.append(writer)
        yield
    finally:
        for writer in writers:
            writer.close()


async def test_idle_connections_starve_neither_the_probe_nor_a_read(launch: Launch) -> None:
    api = await launch()
    async with (
        idle_connections(api, 300),
        # A connection of its own, opened after the idle ones: the server has accepted those
        # by the time it reads this request.
        httpx.AsyncClient(base_url=api.url, timeout=10) as http,
    ):
        health, health_took = await timed(http.get("/healthz"))
        read, read_took = await timed(http.get(f"/accounts/{ACCOUNT}"))

    assert health.status_code == 200, health.text
    assert read.status_code == 200, read.text
    assert read.json()["balance"] == 10
    assert health_took < PROMPT_SECONDS
    assert read_took < PROMPT_SECONDS


WAITING_READS = [
    f"/accounts/{ACCOUNT}?min_version=99",
    f"/accounts/{ACCOUNT}/transactions?min_version=99",
    f"/owners/alice/summary?account_id={ACCOUNT}&min_version=99",
    f"/transfers/{uuid4()}?min_version=1",
]


async def test_reads_waiting_for_a_version_that_never_comes_are_bounded(launch: Launch) -> None:
    api = await launch(
        CQRS_READ_WAIT_MAX_WAITERS="200",
        CQRS_READ_WAIT_SECONDS="30",
        CQRS_HTTP_REQUEST_TIMEOUT_SECONDS="60",
    )
    unbounded = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=60, limits=unbounded) as waiting,
        httpx.AsyncClient(base_url=api.url, timeout=10) as http,
    ):
        # 200 reads over all four routes that wait, none of which will ever be satisfied.
        waits = [
            asyncio.create_task(waiting.get(WAITING_READS[i % len(WAITING_READS)]))
            for i in range(200)
        ]
        try:
            await eventually(
                lambda: scrape(http), lambda samples: value(samples, "cqrs_http_read_waits") == 200
            )
            health, health_took = await timed(http.get("/healthz"))
            read, read_took = await timed(http.get(f"/accounts/{ACCOUNT}"))
            # Already there: a read whose version has arrived needs no waiting slot.
            fresh, fresh_took = await timed(http.get(f"/accounts/{ACCOUNT}?min_version=1"))
            beyond = [await timed(http.get(path)) for path in WAITING_READS]
            answered = [wait for wait in waits if wait.done()]
            samples = await scrape(http)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    assert answered == []  # all 200 were still waiting while the others were answered
    assert (health.status_code, read.status_code, fresh.status_code) == (200, 200, 200)
    assert read.json()["balance"] == fresh.json()["balance"] == 10
    assert max(health_took, read_took, fresh_took) < PROMPT_SECONDS
    for response, took in beyond:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["reason"] == "too_many_waiting_reads"
        assert took < PROMPT_SECONDS
    assert value(samples, "cqrs_http_refused_total", reason="too_many_waiting_reads") == 4


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    """One HTTP/1.1 request on a raw connection that stays open; the response's status line."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head.split(b"\r\n", 1)[0]


async def _closed_after(reader: asyncio.StreamReader, since: float) -> float:
    """Seconds from `since` until the server closed the connection (EOF)."""
    while await asyncio.wait_for(reader.read(65536), 10):
        pass
    return time.monotonic() - since


async def test_a_connection_without_a_request_head_is_closed_after_the_header_timeout(
    launch: Launch,
) -> None:
    api = await launch(CQRS_HTTP_HEADER_TIMEOUT_SECONDS="1", CQRS_READ_WAIT_SECONDS="2")
    opened = time.monotonic()
    silent_reader, silent = await asyncio.open_connection(api.host, api.port)
    partial_reader, partial = await asyncio.open_connection(api.host, api.port)
    partial.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n")  # the head never ends
    kept_reader, kept = await asyncio.open_connection(api.host, api.port)
    slow_reader, slow = await asyncio.open_connection(api.host, api.port)

    async def kept_alive() -> tuple[bytes, float]:
        status = await _request(kept_reader, kept, "/healthz")
        return status, await _closed_after(kept_reader, time.monotonic())

    async def slow_read() -> tuple[bytes, float]:
        # Answered after 2 s, longer than the header timeout: that deadline ends with the head.
        status = await _request(slow_reader, slow, f"/accounts/{ACCOUNT}?min_version=99")
        return status, time.monotonic() - opened

    try:
        (
            silent_closed,
            partial_closed,
            (kept_status, kept_closed),
            (slow_status, slow_took),
        ) = await asyncio.gather(
            _closed_after(silent_reader, opened),
            _closed_after(partial_reader, opened),
            kept_alive(),
            slow_read(),
        )
    finally:
        for writer in (silent, partial, kept, slow):
            writer.close()

    assert 0.9 <= silent_closed < 3, silent_closed
    assert 0.9 <= partial_closed < 3, partial_closed
    # Its deadline for the next head began when its response ended (uvicorn's own keep-alive
    # timeout, 5 s, would be later).
    assert kept_status == b"HTTP/1.1 200 OK"
    assert 0.9 <= kept_closed < 3, kept_closed
    assert slow_status == b"HTTP/1.1 504 Gateway Timeout"
    assert slow_took >= 2
