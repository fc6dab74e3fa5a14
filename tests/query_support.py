"""Helpers for the query service's tests: account event envelopes and polling."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TypeVar
from uuid import UUID, uuid4

import aio_pika
import httpx
from aio_pika.abc import AbstractExchange
from fastapi import FastAPI

from shared.ledger import ACCOUNT, AccountOpened, MoneyDeposited
from shared.messages import Event, EventEnvelope, EventMetadata
from shared.topology import AGGREGATE_ID_HEADER

T = TypeVar("T")

# The first generation of each read model's collections, where a fresh database starts.
ACCOUNTS = "accounts_v1"
TRANSACTIONS = "transactions_v1"
TRANSACTION_HEADS = "transaction_heads_v1"
OWNER_ACCOUNTS = "owner_accounts_v1"
TRANSFERS = "transfers_v1"

# Global positions only need to grow within a test; a shared counter keeps them unique.
_positions = itertools.count(1)
_BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)


def next_position() -> int:
    return next(_positions)


def envelope(
    aggregate_id: UUID,
    version: int,
    event: Event,
    *,
    position: int | None = None,
    aggregate_type: str = ACCOUNT,
    event_type: str | None = None,
) -> EventEnvelope:
    """An envelope as the command service's relay would publish it."""
    return EventEnvelope(
        event_id=uuid4(),
        type=event_type or event.type_name(),
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        version=version,
        position=position if position is not None else next_position(),
        # Whole milliseconds, as MongoDB stores them, so read-back values compare equal.
        recorded_at=_BASE_TIME + timedelta(seconds=version),
        data=event.model_dump(mode="json"),
        metadata=EventMetadata(correlation_id=f"corr-{uuid4()}", causation_id=str(uuid4())),
    )


def opened_account(
    account_id: UUID, *, owner_id: str = "alice", currency: str = "EUR", deposit: int = 0
) -> list[EventEnvelope]:
    """The events of `OpenAccount`: the opening, then the initial deposit as version 2."""
    events = [envelope(account_id, 1, AccountOpened(owner_id=owner_id, currency=currency))]
    if deposit:
        events.append(envelope(account_id, 2, MoneyDeposited(amount=deposit)))
    return events


def relay_message(event: EventEnvelope, *, body: bytes | None = None) -> aio_pika.Message:
    """The AMQP message the relay publishes for `event`."""
    return aio_pika.Message(
        body=event.model_dump_json().encode() if body is None else body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event.event_id),
        type=event.type,
        correlation_id=event.metadata.correlation_id,
        headers={
            AGGREGATE_ID_HEADER: str(event.aggregate_id),
            "version": event.version,
            "position": event.position,
        },
    )


async def publish(exchange: AbstractExchange, event: EventEnvelope) -> None:
    await exchange.publish(relay_message(event), routing_key=event.routing_key)


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
) -> T:
    """Poll `probe` until `accept` holds for its value; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for `app` in this process, with the app's lifespan entered around it."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as http,
    ):
        yield http


REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunningApi:
    """A query service process serving its API at `url`."""

    url: str
    host: str
    port: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def query_api_process(
    settings: dict[str, str], *, log: IO[bytes] | None = None
) -> AsyncIterator[RunningApi]:
    """`python -m query_service` serving the API only (no projector, so nothing catches up),
    with these `CQRS_*` settings; its log (JSON lines) to `log`; killed at the end."""
    port = free_port()
    env = {
        **os.environ,
        "CQRS_HTTP_HOST": "127.0.0.1",
        "CQRS_HTTP_PORT": str(port),
        "CQRS_RUN_PROJECTOR": "false",
        "CQRS_LOG_JSON": "true",
        "CQRS_LOG_LEVEL": "WARNING",
        **settings,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "query_service", cwd=REPO, env=env, stderr=log
    )
    api = RunningApi(f"http://127.0.0.1:{port}", "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=2) as http:

            async def health() -> int:
                try:
                    return (await http.get("/healthz")).status_code
                except httpx.TransportError:
                    return 0

            await eventually(health, lambda status: status == 200)
        yield api
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
