"""Asking the command service for a replay over RabbitMQ, and reading the stream it sends.

The query service never reads PostgreSQL. It declares a durable queue of its own,
`cqrs.replay.<request id>`, publishes a `ReplayRequest` naming it to the `cqrs.replay` exchange
with routing key `cqrs.replay.requests` (its broker user has no access to the default
exchange), and reads `ReplayStarted`, the events in position order, then `ReplayFinished`.
The queue is deleted when the stream ends, and expires by itself if this process dies first.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pamqp.commands import Basic
from pydantic import ValidationError

from query_service.projections.envelope import UnreadableMessage, parse_envelope
from query_service.service_layer.rebuild import (
    RebuildError,
    ReplayEvents,
    ReplayFinished,
    ReplayItem,
    ReplayStarted,
)
from shared import topology
from shared.messages import EventEnvelope, ReplayProgress, ReplayRequest

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

REPLY_QUEUE_PREFIX = "cqrs.replay."
# An abandoned reply queue disappears after an hour without a consumer.
REPLY_QUEUE_EXPIRES_MS = 3_600_000


class ReplayUnavailableError(RebuildError):
    """No command service receives replay requests."""


class ReplayTimeoutError(RebuildError):
    """No replay message came in time: no command service answering, or it stalled."""


class AmqpReplaySource:
    """Requests replays and yields their frames and events in batches."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        batch_size: int = 500,
        start_timeout: float = 60.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self._connection = connection
        self._batch_size = batch_size
        self._start_timeout = start_timeout
        self._idle_timeout = idle_timeout

    async def replay(
        self, *, after_position: int, aggregate_types: Sequence[str]
    ) -> AsyncIterator[ReplayItem]:
        request_id = uuid.uuid4()
        request = ReplayRequest(
            request_id=request_id,
            reply_queue=f"{REPLY_QUEUE_PREFIX}{request_id}",
            after_position=after_position,
            aggregate_types=list(aggregate_types) or None,
        )
        channel = await self._connection.channel()
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def receive(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        try:
            await channel.set_qos(prefetch_count=2 * self._batch_size)
            queue = await channel.declare_queue(
                request.reply_queue,
                durable=True,
                arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
            )
            await queue.consume(receive)
            requests = await channel.declare_exchange(
                topology.REPLAY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            confirmation = await requests.publish(
                aio_pika.Message(
                    body=request.model_dump_json().encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=str(request_id),
                    type="ReplayRequest",
                ),
                routing_key=topology.REPLAY_REQUESTS_QUEUE,
                mandatory=True,
            )
            if not isinstance(confirmation, Basic.Ack):
                # Returned unroutable: no command service has declared its request queue.
                raise ReplayUnavailableError(
                    f"nothing receives replay requests on {topology.REPLAY_EXCHANGE}: "
                    "has a command service started?"
                )
            log.info(
                "replay_requested",
                request_id=str(request_id),
                after_position=after_position,
                aggregate_types=request.aggregate_types,
            )
            started = False
            while True:
                batch = await self._next_batch(inbox, started)
                events: list[EventEnvelope] = []
                for message in batch:
                    if message.type in (topology.REPLAY_STARTED, topology.REPLAY_FINISHED):
                        progress = _progress(message, request_id)
                        if progress is None:
                            continue
                        if events:
                            yield ReplayEvents(events)
                            events = []
                        if message.type == topology.REPLAY_STARTED:
                            started = True
                            yield ReplayStarted(progress)
                        elif started:
                            await message.ack(multiple=True)
                            yield ReplayFinished(progress)
                            return
                    elif started:
                        try:
                            events.append(parse_envelope(message.body, dict(message.headers or {})))
                        except UnreadableMessage as e:
                            log.warning("replayed_message_unreadable", reason=str(e))
                    # An event before any ReplayStarted is not ours to count: dropped.
                if events:
                    yield ReplayEvents(events)
                # Acked once applied: the queue also paces the stream (prefetch).
                await batch[-1].ack(multiple=True)
        finally:
            await self._cleanup(channel, request.reply_queue)

    async def _next_batch(
        self, inbox: asyncio.Queue[AbstractIncomingMessage], started: bool
    ) -> list[AbstractIncomingMessage]:
        timeout = self._idle_timeout if started else self._start_timeout
        try:
            first = await asyncio.wait_for(inbox.get(), timeout)
        except TimeoutError as e:
            what = "no replay message" if started else "the replay did not start"
            raise ReplayTimeoutError(f"{what} within {timeout}s") from e
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(inbox.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _cleanup(self, channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
        try:
            if not channel.is_closed:
                await channel.queue_delete(queue)
                await channel.close()
        except (*CONNECTION_EXCEPTIONS, aio_pika.exceptions.ChannelClosed) as e:
            log.warning("replay_queue_cleanup_failed", queue=queue, error=repr(e))


def _progress(message: AbstractIncomingMessage, request_id: uuid.UUID) -> ReplayProgress | None:
    try:
        progress = ReplayProgress.model_validate_json(message.body)
    except ValidationError as e:
        log.warning("replay_frame_unreadable", type=message.type, error=str(e))
        return None
    if progress.request_id != request_id:
        log.warning("replay_frame_of_another_request", request_id=str(progress.request_id))
        return None
    return progress
