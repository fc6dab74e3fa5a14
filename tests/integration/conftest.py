"""Fixtures for tests against the real servers: fresh databases and a running command service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from command_service.adapters.migrations import migrate
from command_service.adapters.postgres_event_store import PostgresEventStore, create_pool
from command_service.bootstrap import CommandService, start
from command_service.settings import CommandServiceSettings
from shared.client import CommandClient
from tests.tcp_proxy import TcpProxy, proxy_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a migrated fresh database."""
    pool = await create_pool(pg_dsn, 10)
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> PostgresEventStore:
    return PostgresEventStore(pool)


@pytest.fixture
def command_settings(broker: str, pg_dsn: str) -> CommandServiceSettings:
    """The command service's settings for tests. Without the authorization policy: these tests
    publish as the broker's guest, often raw messages without `user_id`, and are about other
    things (test_authorization.py turns it on)."""
    return CommandServiceSettings(
        amqp_url=broker,
        authorization="off",
        postgres_dsn=pg_dsn,
        command_partitions=2,
        max_message_bytes=4096,
        relay_poll_seconds=0.2,
        log_json=True,
        http_port=0,  # any free port: tests run services side by side
    )


@pytest.fixture
async def command_service(
    command_settings: CommandServiceSettings,
) -> AsyncIterator[CommandService]:
    service = await start(command_settings)
    yield service
    await service.stop()


@pytest.fixture
async def client(broker: str, command_service: CommandService) -> AsyncIterator[CommandClient]:
    client = await CommandClient.connect(broker)
    yield client
    await client.close()


@pytest.fixture
async def postgres_proxy(pg_dsn: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy to PostgreSQL that a test can cut and restore (`tests.tcp_proxy.through`)."""
    async with proxy_for(pg_dsn) as proxy:
        yield proxy


@pytest.fixture
async def broker_proxy(broker: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy to RabbitMQ that a test can cut and restore."""
    async with proxy_for(broker) as proxy:
        yield proxy
