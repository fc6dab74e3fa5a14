"""A stand-in for the command service's replay server: answers replay requests from a list."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from shared import topology
from shared.messages import EventEnvelope, ReplayProgress, ReplayRequest
from tests.query_support import relay_message


@dataclass
class FakeReplayServer:
    """Streams `events` (a list the test may keep appending to, in position order).

    `restart_after`: the first stream stops after that many events and starts over with a new
    `ReplayStarted`, as when the command-service replica streaming it dies mid-way.
    `pause`: seconds to wait between events, to stretch a replay.
    """

    amqp_url: str
    events: list[EventEnvelope]
    restart_after: int | None = None
    pause: float = 0.0
    requests: list[ReplayRequest] = field(default_factory=list)
    _connection: AbstractConnection | None = None
    _restarted: bool = False

    async def __aenter__(self) -> FakeReplayServer:
        self._connection = await aio_pika.connect(self.amqp_url)
        channel = await self._connection.channel(publisher_confirms=True)
        requests = await channel.declare_exchange(
            topology.REPLAY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(topology.REPLAY_REQUESTS_QUEUE, durable=True)
        await queue.bind(requests, routing_key=topology.REPLAY_REQUESTS_QUEUE)
        await queue.purge()

        async def answer(message: AbstractIncomingMessage) -> None:
            await self._answer(channel, message)

        await queue.consume(answer)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _answer(self, channel: AbstractChannel, message: AbstractIncomingMessage) -> None:
        request = ReplayRequest.model_validate_json(message.body)
        self.requests.append(request)
        snapshot = list(self.events)
        up_to = request.up_to_position
        if up_to is None:
            up_to = max((event.position for event in snapshot), default=0)
        selected = [
            event
            for event in snapshot
            if request.after_position < event.position <= up_to
            and (request.aggregate_types is None or event.aggregate_type in request.aggregate_types)
        ]
        progress = ReplayProgress(
            request_id=request.request_id,
            total=len(selected),
            after_position=request.after_position,
            up_to_position=up_to,
        )
        exchange = channel.default_exchange
        await self._frame(channel, request, topology.REPLAY_STARTED, progress)
        if self.restart_after is not None and not self._restarted:
            self._restarted = True
            for event in selected[: self.restart_after]:
                await exchange.publish(relay_message(event), routing_key=request.reply_queue)
            await self._frame(channel, request, topology.REPLAY_STARTED, progress)
        for event in selected:
            await exchange.publish(relay_message(event), routing_key=request.reply_queue)
            if self.pause:
                await asyncio.sleep(self.pause)
        await self._frame(channel, request, topology.REPLAY_FINISHED, progress)
        await message.ack()

    async def _frame(
        self, channel: AbstractChannel, request: ReplayRequest, kind: str, progress: ReplayProgress
    ) -> None:
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=progress.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                type=kind,
            ),
            routing_key=request.reply_queue,
        )
