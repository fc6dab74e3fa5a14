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
from tests.query_support import RunningApi, opened_account, query_api_process
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
