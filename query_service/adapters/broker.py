"""RabbitMQ: the projector's topology as small value objects, its declaration, and parking.

```
cqrs.events (topic) --#--> cqrs.projector.partitioned (x-consistent-hash on header aggregate_id)
    --weight 1--> cqrs.projector.p0 .. p{P-1}  (single active consumer, dead letters -> parked)
cqrs.projector.parked (fanout) --> cqrs.projector.parked  (bounded; full: refuses, see below)
```

Every replica consumes all P queues; single-active-consumer lets one replica at a time deliver from
each queue, so the events of one aggregate (always hashed to the same queue) stay in order.

The parked queue is bounded in messages and bytes with `reject-publish`: parked events are
accepted events that a read model lacks, so the broker never drops one to make room; a full queue
refuses the park (`ParkedQueueFullError`) and the projector keeps the event in its partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)

from cqrs_runtime.messaging import QueueBounds, copy_message, declare_bounded_queue
from shared.topology import (
    AGGREGATE_ID_HEADER,
    EVENTS_EXCHANGE,
    PROJECTOR_PARKED_EXCHANGE,
    PROJECTOR_PARKED_QUEUE,
    PROJECTOR_PARTITION_EXCHANGE,
    REASON_HEADER,
    projector_partition_queue,
)

# Where a parked message came from, so a replay can send it back the same way.
ORIGINAL_EXCHANGE_HEADER = "x-cqrs-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-cqrs-original-routing-key"
# Reasons can quote user input; keep headers small.
MAX_REASON_LENGTH = 1_000
# Each queue is bound once with weight 1, so partitions get equal shares of the hash ring.
PARTITION_WEIGHT = "1"


@dataclass(frozen=True)
class ExchangeSpec:
    """An exchange to declare."""

    name: str
    type: aio_pika.ExchangeType
    arguments: Mapping[str, Any] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue to declare and the bindings that feed it."""

    name: str
    source: str
    routing_key: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    durable: bool = True


def events_exchange() -> ExchangeSpec:
    return ExchangeSpec(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC)


def partition_exchange() -> ExchangeSpec:
    return ExchangeSpec(
        PROJECTOR_PARTITION_EXCHANGE,
        aio_pika.ExchangeType.X_CONSISTENT_HASH,
        {"hash-header": AGGREGATE_ID_HEADER},
    )


def parked_exchange() -> ExchangeSpec:
    return ExchangeSpec(PROJECTOR_PARKED_EXCHANGE, aio_pika.ExchangeType.FANOUT)


def parked_bounds(max_messages: int, max_bytes: int) -> QueueBounds:
    return QueueBounds(max_messages, max_bytes, overflow="reject-publish")


def partition_queue(index: int) -> QueueSpec:
    return QueueSpec(
        projector_partition_queue(index),
        source=PROJECTOR_PARTITION_EXCHANGE,
        routing_key=PARTITION_WEIGHT,
        arguments={
            "x-single-active-consumer": True,
            "x-dead-letter-exchange": PROJECTOR_PARKED_EXCHANGE,
        },
    )


@dataclass(frozen=True)
class ProjectorTopology:
    """Everything the projector declares for `partitions` partition queues."""

    partitions: int
    parked: QueueBounds

    @property
    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        return (events_exchange(), partition_exchange(), parked_exchange())

    @property
    def partition_queues(self) -> tuple[QueueSpec, ...]:
        return tuple(partition_queue(index) for index in range(self.partitions))


@dataclass(frozen=True)
class DeclaredTopology:
    """The declared objects the projector works with."""

    partition_queues: tuple[AbstractQueue, ...]
    parked_exchange: AbstractExchange
    parked_queue: AbstractQueue


async def connect(amqp_url: str) -> AbstractRobustConnection:
    """A connection that reconnects and restores its channels, topology and consumers."""
    return await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": "cqrs-query-service"}
    )


async def declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> AbstractExchange:
    return await channel.declare_exchange(
        spec.name, spec.type, durable=spec.durable, arguments=dict(spec.arguments) or None
    )


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    queue = await channel.declare_queue(
        spec.name, durable=spec.durable, arguments=dict(spec.arguments) or None
    )
    await queue.bind(spec.source, spec.routing_key)
    return queue


async def declare_projector_topology(
    channel: AbstractChannel, topology: ProjectorTopology
) -> DeclaredTopology:
    """Declare (idempotently) the exchanges, queues and bindings of `topology`."""
    events, partitioned, parked = [
        await declare_exchange(channel, spec) for spec in topology.exchanges
    ]
    await partitioned.bind(events, "#")
    parked_q = await declare_bounded_queue(channel, PROJECTOR_PARKED_QUEUE, topology.parked)
    await parked_q.bind(parked, "")
    queues = tuple([await declare_queue(channel, spec) for spec in topology.partition_queues])
    return DeclaredTopology(partition_queues=queues, parked_exchange=parked, parked_queue=parked_q)


class ParkedQueueFullError(Exception):
    """The parked queue is at its bound and refused the event; the original must stay queued."""


class AmqpParker:
    """Moves a message that cannot be projected to the parked exchange, reason in its headers.

    The publish is confirmed by the broker before it returns, so the caller may ack the original;
    a negative confirm (the parked queue is full) raises `ParkedQueueFullError`.
    """

    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange

    async def park(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers: HeadersType = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:MAX_REASON_LENGTH]
        headers[ORIGINAL_EXCHANGE_HEADER] = message.exchange or ""
        headers[ORIGINAL_ROUTING_KEY_HEADER] = message.routing_key or ""
        try:
            await self._exchange.publish(
                copy_message(message, headers), routing_key=message.routing_key or ""
            )
        except aio_pika.exceptions.DeliveryError as e:
            raise ParkedQueueFullError(
                f"{PROJECTOR_PARKED_QUEUE} refused the event (at its length or byte bound)"
            ) from e


class BrokerLink:
    """One AMQP connection for probes and admin work, opened on first use, reopened if lost."""

    def __init__(self, amqp_url: str, *, connect_timeout: float = 5.0) -> None:
        self._url = amqp_url
        self._timeout = connect_timeout
        self._connection: AbstractRobustConnection | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> AbstractRobustConnection:
        async with self._lock:
            if self._connection is None or self._connection.is_closed:
                self._connection = await asyncio.wait_for(connect(self._url), self._timeout)
            return self._connection

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()


async def queue_depths(
    connection: AbstractRobustConnection, names: Sequence[str]
) -> dict[str, int]:
    """Messages ready in each queue (a passive declare; a missing queue raises ChannelClosed)."""
    channel = await connection.channel()
    try:
        depths = {}
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            depths[name] = int(queue.declaration_result.message_count or 0)
        return depths
    finally:
        if not channel.is_closed:
            await channel.close()
