"""Where the real services are.

Addresses come from environment variables when set (`CQRS_TEST_AMQP_URL`,
`CQRS_TEST_POSTGRES_DSN`, `CQRS_TEST_MONGO_URL`; separate from the services' own `CQRS_*`
settings, because tests delete the topology they find there); otherwise the servers are
started as containers when a Docker engine answers; otherwise the session stops with a message
that names what is missing. Nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import aio_pika
import asyncpg
import pytest
from pymongo import AsyncMongoClient

from shared import topology

# Enough for the tests; deleting more partitions than exist is harmless.
MAX_TEST_PARTITIONS = 8


@dataclass(frozen=True)
class Services:
    amqp_url: str
    postgres_dsn: str  # a server-level DSN; tests create their own databases
    mongo_url: str


def _docker_answers() -> bool:
    try:
        import docker  # installed with testcontainers

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False
    return True


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    wanted = {
        "CQRS_TEST_AMQP_URL": os.environ.get("CQRS_TEST_AMQP_URL"),
        "CQRS_TEST_POSTGRES_DSN": os.environ.get("CQRS_TEST_POSTGRES_DSN"),
        "CQRS_TEST_MONGO_URL": os.environ.get("CQRS_TEST_MONGO_URL"),
    }
    missing = [name for name, value in wanted.items() if not value]
    with ExitStack() as stack:
        if missing:
            if not _docker_answers():
                pytest.exit(
                    "integration tests need real servers: set "
                    + ", ".join(missing)
                    + " (scripts/test does this on a machine without Docker), "
                    "or run a Docker engine so testcontainers can start them",
                    returncode=3,
                )
            wanted.update(_start_containers(stack, missing))
        yield Services(
            amqp_url=str(wanted["CQRS_TEST_AMQP_URL"]),
            postgres_dsn=str(wanted["CQRS_TEST_POSTGRES_DSN"]),
            mongo_url=str(wanted["CQRS_TEST_MONGO_URL"]),
        )


def _start_containers(stack: ExitStack, missing: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    if "CQRS_TEST_AMQP_URL" in missing:
        from testcontainers.rabbitmq import RabbitMqContainer

        rabbit = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-management"))
        rabbit.exec(["rabbitmq-plugins", "enable", "rabbitmq_consistent_hash_exchange"])
        host, port = rabbit.get_container_host_ip(), rabbit.get_exposed_port(5672)
        found["CQRS_TEST_AMQP_URL"] = f"amqp://guest:guest@{host}:{port}/"
    if "CQRS_TEST_POSTGRES_DSN" in missing:
        from testcontainers.postgres import PostgresContainer

        pg = stack.enter_context(PostgresContainer("postgres:16", driver=None))
        found["CQRS_TEST_POSTGRES_DSN"] = pg.get_connection_url()
    if "CQRS_TEST_MONGO_URL" in missing:
        from testcontainers.mongodb import MongoDbContainer

        mongo = stack.enter_context(MongoDbContainer("mongo:7"))
        found["CQRS_TEST_MONGO_URL"] = mongo.get_connection_url()
    return found


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at another database."""
    base, _, _ = dsn.rpartition("/")
    if "://" not in base:  # DSN without a database part
        base = dsn.rstrip("/")
    return f"{base}/{database}"


@pytest.fixture
async def pg_dsn(services: Services) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"cqrs_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.postgres_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield with_database(services.postgres_dsn, name)
    admin = await asyncpg.connect(services.postgres_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def mongo_db(services: Services) -> AsyncIterator[str]:
    """A fresh MongoDB database name for one test, dropped afterwards."""
    name = f"cqrs_test_{uuid.uuid4().hex[:12]}"
    yield name
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(services.mongo_url)
    try:
        await client.drop_database(name)
    finally:
        await client.close()


async def reset_broker(amqp_url: str) -> None:
    """Delete every queue and exchange the services declare, so a test starts from nothing."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queues, exchanges = topology.declared_names(MAX_TEST_PARTITIONS)
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


@pytest.fixture
async def broker(services: Services) -> AsyncIterator[str]:
    """The AMQP URL, with the services' topology deleted before and after the test."""
    await reset_broker(services.amqp_url)
    yield services.amqp_url
    await reset_broker(services.amqp_url)
