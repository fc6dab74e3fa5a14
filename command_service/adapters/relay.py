"""The outbox relay: publishes committed events to `cqrs.events` with publisher confirms.

It runs as the `relay` subscription to the event store (see `subscription.py`): one active
replica, global position order, checkpoint stored only after the broker confirmed the batch, so
a crash re-publishes (same `event_id`) rather than loses.

No stored content can make a publish fail: `broker.event_message` copies into AMQP properties
and headers only values that fit them, the rest travels in the body. Should a publish still fail
for a reason that is not an outage, the batch fails with `publish_failed` (an ERROR log with the
positions, the task-failure metric, the relay named in `/readyz`) and is tried again after a
backoff; it is never skipped.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aio_pika.abc import AbstractExchange

from command_service.adapters.broker import event_message
from command_service.adapters.subscription import RECOVERABLE_ERRORS
from command_service.metrics import CommandMetrics
from command_service.service_layer.event_store import StoredEvent
from cqrs_runtime.supervision import Failure

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
        try:
            await asyncio.gather(
                *(
                    self._exchange.publish(
                        event_message(envelope := event.to_envelope()),
                        routing_key=envelope.routing_key,
                    )
                    for event in events
                )
            )
        except RECOVERABLE_ERRORS:
            raise
        except Exception as e:
            raise Failure(
                "publish_failed",
                f"events at positions {events[0].position}..{events[-1].position} could not be "
                "published; retried after a backoff, never skipped",
            ) from e
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
