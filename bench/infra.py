"""Fresh databases and a clean broker vhost for every measured configuration."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection
from pymongo import AsyncMongoClient

from shared import topology

# More than any configuration here uses; deleting a queue that does not exist is harmless.
MAX_PARTITIONS = 16

BENCH_QUEUES = (
    "bench.raw.commands",
    "bench.raw.events",
    "bench.naive.commands",
    "bench.naive.events",
)
BENCH_EXCHANGES = (
    "bench.raw.commands",
    "bench.raw.events",
    "bench.naive.commands",
    "bench.naive.events",
)


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at another database."""
    base, _, _ = dsn.rpartition("/")
    if "://" not in base:  # a DSN without a database part
        base = dsn.rstrip("/")
    return f"{base}/{database}"


@contextlib.asynccontextmanager
async def fresh_database(server_dsn: str, prefix: str = "cqrs_bench") -> AsyncIterator[str]:
    """A new, empty PostgreSQL database (its DSN), dropped on the way out."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_dsn, name)
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def fresh_mongo_database(mongo_url: str) -> AsyncIterator[str]:
    """A new MongoDB database name, dropped on the way out."""
    name = f"cqrs_bench_{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url)
        try:
            await client.drop_database(name)
        finally:
            await client.close()


async def reset_vhost(amqp_url: str) -> None:
    """Delete every queue and exchange the services and the benchmark declare."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queues, exchanges = topology.declared_names(MAX_PARTITIONS)
        for queue in [*queues, *BENCH_QUEUES]:
            await channel.queue_delete(queue)
        for exchange in [*exchanges, *BENCH_EXCHANGES]:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


class QueueProbe:
    """Reads queue depths and consumer counts by passive declaration, on its own connection."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None

    @classmethod
    async def connect(cls, amqp_url: str) -> QueueProbe:
        return cls(await aio_pika.connect(amqp_url))

    async def close(self) -> None:
        await self._connection.close()

    async def depth(self, name: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue; None when it does not exist."""
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        try:
            queue = await self._channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            self._channel = None  # a passive declaration of a missing queue closes the channel
            return None
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def total_depth(self, names: Sequence[str]) -> int:
        total = 0
        for name in names:
            found = await self.depth(name)
            total += found[0] if found else 0
        return total

    async def wait_empty(
        self, names: Sequence[str], timeout: float, *, settle_polls: int = 3
    ) -> float:
        """Until every queue in `names` is empty `settle_polls` polls in a row; seconds taken."""
        started = time.monotonic()
        empty_polls = 0
        while empty_polls < settle_polls:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"queues {list(names)} did not drain within {timeout}s")
            empty_polls = empty_polls + 1 if await self.total_depth(names) == 0 else 0
            await asyncio.sleep(0.1)
        return time.monotonic() - started


def projector_queues(partitions: int) -> list[str]:
    return [topology.projector_partition_queue(i) for i in range(partitions)]


def command_queues(partitions: int) -> list[str]:
    return [topology.command_partition_queue(i) for i in range(partitions)]


async def wait_store_idle(dsn: str, timeout: float) -> float:
    """Until every subscription of the event store (relay, process managers) has caught up.

    The command side is idle when the newest position stopped moving and every checkpoint is
    at it; returns the seconds that took.
    """
    started = time.monotonic()
    connection = await asyncpg.connect(dsn)
    try:
        previous = -1
        while True:
            last = int(await connection.fetchval("SELECT last FROM event_position") or 0)
            rows = await connection.fetch("SELECT position FROM checkpoints")
            caught_up = bool(rows) and all(int(row["position"]) == last for row in rows)
            if last == 0 or (caught_up and last == previous):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"the event store's subscriptions did not catch up within {timeout}s "
                    f"(last position {last}, checkpoints {[int(r['position']) for r in rows]})"
                )
            previous = last
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


async def last_position(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval("SELECT last FROM event_position") or 0)
    finally:
        await connection.close()
