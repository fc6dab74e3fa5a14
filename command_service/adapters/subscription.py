"""Subscriptions to the event store: read every event in global position order, once per group.

One replica runs a subscription at a time (a PostgreSQL advisory lock, keyed by the
subscription's name, held on the subscription's own connection); the others stand by and take
over when that connection, and so the lock, goes away. The checkpoint is stored only after the
handler returned for a batch, so a crash repeats work rather than skips it: handlers must be
idempotent. Positions are assigned in commit order (see the event store), so reading
"position > checkpoint" never skips an event that committed late.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import asyncpg
import structlog

from command_service.adapters.event_store import (
    EVENTS_CHANNEL,
    TRANSIENT_ERRORS,
    EventStoreUnavailableError,
    StoredEvent,
    init_connection,
    read_all,
)

log = structlog.get_logger(__name__)

BatchHandler = Callable[[list[StoredEvent]], Awaitable[None]]


class RetryLaterError(Exception):
    """Raised by a handler that cannot finish a batch now; the batch is run again later."""


# Failures a subscription waits out: the database or the broker going away.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    # A robust channel refuses work while it reconnects.
    aiormq.exceptions.ChannelInvalidStateError,
)
RECOVERABLE_ERRORS: tuple[type[BaseException], ...] = (
    *TRANSIENT_ERRORS,
    *BROKER_ERRORS,
    EventStoreUnavailableError,
    RetryLaterError,
)


class Subscription:
    """Feeds batches of stored events to `handler`, in position order, from one leader."""

    def __init__(
        self,
        *,
        name: str,
        dsn: str,
        handler: BatchHandler,
        batch_size: int,
        poll_seconds: float,
    ) -> None:
        self.name = name
        self._dsn = dsn
        self._handler = handler
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self.leading = False
        self.position = 0

    async def run(self) -> None:
        """Run until cancelled, waiting out database and broker outages."""
        backoff = self._poll_seconds
        while True:
            try:
                await self._lead()
            except RECOVERABLE_ERRORS as e:
                log.warning("subscription_interrupted", subscription=self.name, error=repr(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self.leading = False

    async def _lead(self) -> None:
        connection = await asyncpg.connect(self._dsn)
        try:
            await init_connection(connection)
            lock_key = await connection.fetchval("SELECT hashtext($1)", f"cqrs.sub.{self.name}")
            while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", lock_key):
                await asyncio.sleep(self._poll_seconds)
            self.leading = True
            wake = asyncio.Event()
            await connection.add_listener(EVENTS_CHANNEL, lambda *_: wake.set())
            self.position = int(
                await connection.fetchval(
                    "SELECT position FROM checkpoints WHERE name = $1", self.name
                )
                or 0
            )
            log.info("subscription_leading", subscription=self.name, position=self.position)
            while True:
                wake.clear()
                events = await read_all(connection, self.position, self._batch_size)
                if events:
                    await self._handler(events)
                    self.position = events[-1].position
                    await connection.execute(
                        """INSERT INTO checkpoints (name, position) VALUES ($1, $2)
                           ON CONFLICT (name) DO UPDATE SET position = excluded.position""",
                        self.name,
                        self.position,
                    )
                if len(events) < self._batch_size:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), self._poll_seconds)
        finally:
            with contextlib.suppress(*RECOVERABLE_ERRORS):
                await connection.close(timeout=2)
