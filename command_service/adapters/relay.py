"""The outbox relay: publishes committed events to `cqrs.events` with publisher confirms.

It runs as the `relay` subscription to the event store (see `subscription.py`): one active
replica, global position order, checkpoint stored only after the broker confirmed the batch, so
a crash re-publishes (same `event_id`) rather than loses.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aio_pika.abc import AbstractExchange

from command_service.adapters.broker import event_message
from command_service.adapters.event_store import StoredEvent
from command_service.metrics import CommandMetrics

log = structlog.get_logger(__name__)

RELAY_SUBSCRIPTION = "relay"


class EventPublisher:
    """Publishes a batch of stored events; returns once the broker confirmed all of them."""

    def __init__(self, exchange: AbstractExchange, metrics: CommandMetrics | None = None) -> None:
        self._exchange = exchange
        self._metrics = metrics
        self.published = 0

    async def __call__(self, events: list[StoredEvent]) -> None:
        started = time.perf_counter()
        # Publishes are written in call order on one channel (aiormq takes a FIFO lock per
        # publish), so per-aggregate order holds while the confirms are awaited together.
        await asyncio.gather(
            *(
                self._exchange.publish(
                    event_message(envelope := event.to_envelope()),
                    routing_key=envelope.routing_key,
                )
                for event in events
            )
        )
        self.published += len(events)
        if self._metrics is not None:
            self._metrics.relay_publish_seconds.observe(time.perf_counter() - started)
            self._metrics.events_published.inc(len(events))
        log.debug(
            "events_relayed",
            count=len(events),
            first_position=events[0].position,
            last_position=events[-1].position,
        )
