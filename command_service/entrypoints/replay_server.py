"""Answers replay requests: streams stored events into a read-model rebuild's queue.

The query service never reads PostgreSQL; to rebuild a read model it sends a `ReplayRequest`
to `cqrs.replay.requests`, and one replica streams the events, in global position order, into
the request's reply queue, framed by `ReplayStarted` and `ReplayFinished`. The request is acked
only when the whole stream was confirmed by the broker; a replica that dies mid-way leaves the
request to another, which starts the stream over (the consumer's projections are idempotent).
"""

from __future__ import annotations

import asyncio

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from pydantic import ValidationError

from command_service.adapters.broker import event_message
from command_service.adapters.postgres_event_store import (
    count_range,
    last_position,
    read_all,
    translate_driver_errors,
)
from cqrs_runtime.supervision import Supervisor
from shared import topology
from shared.messages import ReplayProgress, ReplayRequest

log = structlog.get_logger(__name__)


class ReplayServer:
    """Consumes replay requests one at a time and streams the events they ask for."""

    name = "replay-server"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        exchange: AbstractExchange,
        batch_size: int,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._pool = pool
        self._exchange = exchange  # the default exchange, on a channel with publisher confirms
        self._batch_size = batch_size

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        try:
            request = ReplayRequest.model_validate_json(message.body)
        except ValidationError as e:
            log.warning("replay_request_rejected", error=str(e))
            await message.reject(requeue=False)
            return
        with structlog.contextvars.bound_contextvars(request_id=str(request.request_id)):
            try:
                await self.stream(request)
            except Exception as e:  # noqa: BLE001 - logged and counted by the supervisor
                self._supervisor.outcome(self.name, e)
                await message.nack(requeue=True)
                await asyncio.sleep(1)  # do not spin on a request that keeps failing
                return
        self._supervisor.outcome(self.name, None)
        await message.ack()

    async def stream(self, request: ReplayRequest) -> ReplayProgress:
        types = request.aggregate_types
        async with translate_driver_errors():
            up_to = request.up_to_position
            if up_to is None:
                up_to = await last_position(self._pool)
            total = await count_range(self._pool, request.after_position, up_to, types)
        progress = ReplayProgress(
            request_id=request.request_id,
            total=total,
            after_position=request.after_position,
            up_to_position=up_to,
        )
        log.info("replay_started", request_id=str(request.request_id), total=total, up_to=up_to)
        await self._frame(request.reply_queue, topology.REPLAY_STARTED, progress)
        position = request.after_position
        while position < up_to:
            async with translate_driver_errors():
                events = await read_all(
                    self._pool, position, self._batch_size, up_to=up_to, aggregate_types=types
                )
            if not events:
                break
            await asyncio.gather(
                *(
                    self._exchange.publish(
                        event_message(event.to_envelope()), routing_key=request.reply_queue
                    )
                    for event in events
                )
            )
            position = events[-1].position
        await self._frame(request.reply_queue, topology.REPLAY_FINISHED, progress)
        log.info("replay_finished", request_id=str(request.request_id), total=total)
        return progress

    async def _frame(self, queue: str, kind: str, progress: ReplayProgress) -> None:
        await self._exchange.publish(
            aio_pika.Message(
                body=progress.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                type=kind,
            ),
            routing_key=queue,
        )
