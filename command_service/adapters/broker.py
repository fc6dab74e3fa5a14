"""The command service's broker topology and the messages it publishes.

Events, replies and dead letters are built here so their properties are defined in one place.
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    FieldValue,
)

from cqrs_runtime import tracing
from cqrs_runtime.messaging import QueueBounds, copy_message, declare_bounded_queue
from shared import topology
from shared.messages import EventEnvelope, Reply
from shared.text import is_identifier

SINGLE_ACTIVE: dict[str, FieldValue] = {"x-single-active-consumer": True}


def dead_letter_bounds(max_messages: int, max_bytes: int) -> QueueBounds:
    """`cqrs.commands.dead` drops its oldest letter when full: every dead letter was refused and
    answered, so none is the only record of an accepted command, and a flood of bad commands
    must never stop the consumer from settling the good ones behind it."""
    return QueueBounds(max_messages, max_bytes, overflow="drop-head")


async def declare_command_topology(
    channel: AbstractChannel, partitions: int, dead_letters: QueueBounds
) -> list[AbstractQueue]:
    """Declare (idempotently) the exchanges and queues commands flow through.

    `cqrs.commands` (topic) → `cqrs.commands.partitioned` (consistent hash on the
    `aggregate_id` header) → P single-active-consumer queues, so that one replica at a time
    handles each partition and commands for one aggregate keep their order. Dead letters go to
    `cqrs.commands.dead`, bounded by `dead_letters`.
    """
    commands = await channel.declare_exchange(
        topology.COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead = await channel.declare_exchange(
        topology.COMMAND_DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await declare_bounded_queue(
        channel, topology.COMMAND_DEAD_LETTER_QUEUE, dead_letters
    )
    await dead_queue.bind(dead)
    queue_arguments: dict[str, FieldValue] = {
        **SINGLE_ACTIVE,
        "x-dead-letter-exchange": topology.COMMAND_DEAD_LETTER_EXCHANGE,
    }
    partitioned = await channel.declare_exchange(
        topology.COMMAND_PARTITION_EXCHANGE,
        aio_pika.ExchangeType.X_CONSISTENT_HASH,
        durable=True,
        arguments={"hash-header": topology.AGGREGATE_ID_HEADER},
    )
    await partitioned.bind(commands, routing_key="#")
    queues = []
    for index in range(partitions):
        queue = await channel.declare_queue(
            topology.command_partition_queue(index), durable=True, arguments=queue_arguments
        )
        await queue.bind(partitioned, routing_key="1")  # the binding key is the ring weight
        queues.append(queue)
    return queues


async def declare_replay_queue(channel: AbstractChannel) -> AbstractQueue:
    exchange = await channel.declare_exchange(
        topology.REPLAY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(topology.REPLAY_REQUESTS_QUEUE, durable=True)
    await queue.bind(exchange, routing_key=topology.REPLAY_REQUESTS_QUEUE)
    return queue


async def declare_events_exchange(channel: AbstractChannel) -> AbstractExchange:
    return await channel.declare_exchange(
        topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )


async def declare_dead_letter_exchange(channel: AbstractChannel) -> AbstractExchange:
    return await channel.declare_exchange(
        topology.COMMAND_DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )


def event_message(envelope: EventEnvelope) -> aio_pika.Message:
    """The message of one event. Properties and headers carry only values that surely fit them
    (an id, numbers, names of a fixed pattern); a correlation id or trace context stored by an
    older version that would not fit travels in the body only, so no content can make a
    publish fail."""
    headers: dict[str, FieldValue] = {
        topology.AGGREGATE_ID_HEADER: str(envelope.aggregate_id),
        "version": envelope.version,
        "position": envelope.position,
    }
    traceparent = envelope.metadata.traceparent
    if traceparent is not None and tracing.is_traceparent(traceparent):
        headers[tracing.TRACEPARENT] = traceparent
    correlation_id = envelope.metadata.correlation_id
    return aio_pika.Message(
        # Without a trace the body is what it was before the field existed, so that consumers
        # which do not know `traceparent` yet keep reading events stored with tracing off.
        body=envelope.model_dump_json(
            exclude={"metadata": {"traceparent"}} if traceparent is None else None
        ).encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(envelope.event_id),
        correlation_id=correlation_id if is_identifier(correlation_id) else None,
        type=envelope.type,
        headers=headers,
    )


def reply_message(reply: Reply, correlation_id: str | None) -> aio_pika.Message:
    return aio_pika.Message(
        body=reply.model_dump_json().encode(),
        content_type="application/json",
        correlation_id=correlation_id,
        type="Reply",
    )


def dead_letter_message(
    original: AbstractIncomingMessage, reason: str, *, max_body_bytes: int
) -> aio_pika.Message:
    """A copy of the original command with the reason it could not be processed, and its sender.

    The copy carries no `user_id` (it is published with the command service's login, and the
    broker refuses another one); the sender's login travels in `x-cqrs-sender` instead.

    A body over `max_body_bytes` (the command limit: such a command is refused anyway) keeps
    only a prefix, with its original size and SHA-256 in the headers, so a flood of large bad
    commands cannot fill the broker with copies of them.
    """
    headers = dict(original.headers or {})
    headers[topology.REASON_HEADER] = reason[:1000]
    # Who sent it, as the broker verified it; a sender's own header of that name says nothing.
    headers.pop(topology.SENDER_HEADER, None)
    if is_identifier(original.user_id):
        headers[topology.SENDER_HEADER] = original.user_id
    headers["x-original-routing-key"] = original.routing_key or ""
    return copy_message(original, headers, max_body_bytes=max_body_bytes)
