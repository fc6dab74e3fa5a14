"""Subscriptions to the event store: read every event in global position order, once per group.

One replica runs a subscription at a time (a PostgreSQL advisory lock, keyed by the
subscription's name, held on the subscription's own connection, see `leadership`); the others
stand by and take over when that connection, and so the lock, goes away, also after a silent
network cut. The checkpoint is stored only after the handler returned for a batch, so a crash
repeats work rather than skips it: handlers must be idempotent. Positions are assigned in commit
order (see the event store), so reading "position > checkpoint" never skips an event that
committed late.

`run` raises whatever interrupts it; the service's supervisor logs it, counts it and runs it again
with backoff. A batch the handler cannot take (an error that is not an outage) is never skipped:
it is tried again after each backoff, and the failure (`handler_failed`, with the batch's
positions in the log) shows in readiness until it goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import structlog

from command_service.adapters.leadership import connect_leader, while_alive
from command_service.adapters.postgres_event_store import (
    EVENTS_CHANNEL,
    TRANSIENT_ERRORS,
    init_connection,
    read_all,
)
from command_service.service_layer.event_store import (
    EventStoreUnavailableError,
    RetryLaterError,
    StoredEvent,
)
from cqrs_runtime.supervision import Failure, mark_healthy

log = structlog.get_logger(__name__)

BatchHandler = Callable[[list[StoredEvent]], Awaitable[None]]


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
# Raised by a handler as they are: outages, and failures that name their reason already.
PASSED_ON: tuple[type[BaseException], ...] = (*RECOVERABLE_ERRORS, Failure)


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
        leader_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self._dsn = dsn
        self._handler = handler
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._leader_timeout = leader_timeout
        self.leading = False
        self.position = 0

    async def run(self) -> None:
        """Stand by for the lock, then lead until cancelled or interrupted (it raises then)."""
        try:
            await self._lead()
        finally:
            self.leading = False

    async def _lead(self) -> None:
        connection = await connect_leader(self._dsn, self._leader_timeout, name=f"cqrs-{self.name}")
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
                    await while_alive(
                        connection, self._handle(events), every=self._leader_timeout / 3
                    )
                    self.position = events[-1].position
                    await connection.execute(
                        """INSERT INTO checkpoints (name, position) VALUES ($1, $2)
                           ON CONFLICT (name) DO UPDATE SET position = excluded.position""",
                        self.name,
                        self.position,
                    )
                mark_healthy()  # a whole round went through
                if len(events) < self._batch_size:
                    # Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation
                    # that arrives as the notification wakes it, and `stop()` would hang.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._poll_seconds):
                            await wake.wait()
        finally:
            with contextlib.suppress(*RECOVERABLE_ERRORS):
                await connection.close(timeout=2)

    async def _handle(self, events: list[StoredEvent]) -> None:
        first, last = events[0].position, events[-1].position
        try:
            await self._handler(events)
        except PASSED_ON:
            raise
        except Exception as e:
            raise Failure(
                "handler_failed",
                f"subscription {self.name} could not handle the events at positions "
                f"{first}..{last}; they are tried again, never skipped",
            ) from e
