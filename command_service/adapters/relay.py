"""The outbox relay: publishes committed events to `cqrs.events` with publisher confirms.

It runs as the `relay` subscription to the event store (see `subscription.py`): one active
replica, global position order, checkpoint stored only after the broker confirmed the batch, so
a crash re-publishes (same `event_id`) rather than loses.
"""

from __future__ import annotations

import asyncio

import structlog
from aio_pika.abc import AbstractExchange

from command_service.adapters.broker import event_message
from command_service.adapters.event_store import StoredEvent

log = structlog.get_logger(__name__)

RELAY_SUBSCRIPTION = "relay"


class EventPublisher:
    """Publishes a batch of stored events; returns once the broker confirmed all of them."""

    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange
        self.published = 0

    async def __call__(self, events: list[StoredEvent]) -> None:
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
        log.debug("events_relayed", count=len(events), last_position=events[-1].position)
