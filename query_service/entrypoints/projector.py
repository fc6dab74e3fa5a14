"""The projector's AMQP consumer and its acknowledgement policy.

- unreadable body (too large, bad JSON, not an event envelope), data failing its schema, a
  version gap that does not close: park with the reason, ack; never block the queue;
- an event no projection handles: ack, nothing to do;
- transient MongoDB errors: retry with bounded backoff, then nack with requeue;
- any other error: log it with its traceback and park the message, so nothing is lost;
- the parked queue full (it refuses rather than drops): hold the message a while, then requeue
  it, so it stays in its partition until an operator makes room;
- ack only after the read-model write is done.

Each delivery runs in a task of the driver's; whatever escapes the policy above (a failure to
park or settle that is not an outage) is contained here: logged, counted against the partition
in the supervisor's table (readiness names a partition that keeps failing), and the message is
requeued after a pause, never lost and never acked unprojected.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, ConsumerTag
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from cqrs_runtime import tracing
from cqrs_runtime.supervision import Supervisor
from query_service.adapters.broker import ParkedQueueFullError
from query_service.entrypoints.lanes import AggregateLanes
from query_service.metrics import ProjectorMetrics
from query_service.projections.envelope import MAX_BODY_BYTES, UnreadableMessage, parse_envelope
from query_service.projections.envelope import as_uuid as _as_uuid
from query_service.projections.store import TRANSIENT_ERRORS
from query_service.service_layer.projector import Outcome, Projected, Rejected
from shared.messages import EventEnvelope
from shared.topology import AGGREGATE_ID_HEADER

if TYPE_CHECKING:
    from opentelemetry.context import Context

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

# How long a message whose handling failed outside the policy waits before it is requeued.
FAILED_REQUEUE_PAUSE_SECONDS = 1.0

EventHandler = Callable[[EventEnvelope], Awaitable[Outcome]]


class Parker(Protocol):
    """Sets a message aside with the reason it cannot be projected; returns once that is durable."""

    async def park(self, message: AbstractIncomingMessage, reason: str) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient store errors; then the message is requeued."""

    attempts: int = 5
    initial_seconds: float = 0.1
    max_seconds: float = 2.0
    transient_errors: tuple[type[Exception], ...] = TRANSIENT_ERRORS


DEFAULT_RETRY_POLICY = RetryPolicy()


class ProjectorConsumer:
    """Consumes the projector's partition queues and settles each message by the ack policy.

    Messages of one aggregate are handled one after another in delivery order (see `lanes`);
    messages of different aggregates run concurrently, up to the prefetch of each queue.
    """

    def __init__(
        self,
        *,
        handler: EventHandler,
        parker: Parker,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        max_body_bytes: int = MAX_BODY_BYTES,
        metrics: ProjectorMetrics | None = None,
        supervisor: Supervisor | None = None,
        park_retry_seconds: float = 5.0,
    ) -> None:
        self.metrics = metrics if metrics is not None else ProjectorMetrics()
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._handler = handler
        self._parker = parker
        self._park_retry_seconds = park_retry_seconds
        self._retry_policy = retry_policy
        self._max_body_bytes = max_body_bytes
        self._lanes = AggregateLanes()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._consumers: dict[str, tuple[AbstractQueue, ConsumerTag]] = {}
        self._queue_of_tag: dict[str, str] = {}
        self._last_delivery: dict[str, float] = {}
        self._released: weakref.WeakSet[object] = weakref.WeakSet()

    async def start(self, queues: Sequence[AbstractQueue]) -> None:
        for queue in queues:
            await self.add(queue)
        log.info("projector_consuming", queues=[queue.name for queue in queues])

    async def add(self, queue: AbstractQueue) -> None:
        """Consume `queue` (again, after its channel was replaced)."""
        tag = await queue.consume(self.on_message)
        self._consumers[queue.name] = (queue, tag)
        self._queue_of_tag[tag] = queue.name

    def forget(self, name: str) -> None:
        """Stop counting `queue` as consumed here (its channel is being closed)."""
        self._consumers.pop(name, None)
        self._last_delivery.pop(name, None)

    def busy_queues(self, within: float) -> list[str]:
        """Queues this consumer received messages from in the last `within` seconds.

        With single-active-consumer this is where this replica is the active one (and busy).
        """
        since = asyncio.get_running_loop().time() - within
        return [
            name
            for name, at in self._last_delivery.items()
            if at >= since and name in self._consumers
        ]

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop taking messages and let those in hand finish.

        What is still unsettled after `grace_seconds` is cancelled; closing the channel afterwards
        makes the broker requeue it.
        """
        consumers, self._consumers = list(self._consumers.values()), {}
        for queue, tag in consumers:
            try:
                await queue.cancel(tag)
            except CONNECTION_EXCEPTIONS as e:
                log.warning("consumer_cancel_failed", queue=queue.name, error=repr(e))
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("projector_stopped_with_unsettled_messages", count=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        queue = self._queue_of_tag.get(message.consumer_tag or "")
        if queue is not None:
            self._last_delivery[queue] = asyncio.get_running_loop().time()
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await self._handle(message)
        except CONNECTION_EXCEPTIONS:
            raise  # the channel is gone: the broker redelivers the message
        except Exception as e:  # noqa: BLE001 - logged and counted by the supervisor
            self._supervisor.outcome(queue or "projector", e)
            if not message.processed:  # it failed before it was settled
                await asyncio.sleep(FAILED_REQUEUE_PAUSE_SECONDS)
                key = _as_uuid((message.headers or {}).get(AGGREGATE_ID_HEADER))
                await self._requeue(message, str(key) if key is not None else None)
        else:
            self._supervisor.outcome(queue or "projector", None)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        # Everything up to `lanes.join` must stay synchronous: tasks start in delivery order,
        # and that order is the lane order only if no task yields before joining.
        headers = dict(message.headers or {})
        try:
            envelope = parse_envelope(message.body, headers, max_bytes=self._max_body_bytes)
        except UnreadableMessage as e:
            aggregate_id = _as_uuid(headers.get(AGGREGATE_ID_HEADER))
            with structlog.contextvars.bound_contextvars(
                correlation_id=message.correlation_id,
                message_id=message.message_id,
                routing_key=message.routing_key,
                aggregate_id=str(aggregate_id) if aggregate_id else None,
            ):
                await self._park(message, str(e))
            return

        key = str(envelope.aggregate_id)
        with structlog.contextvars.bound_contextvars(
            correlation_id=envelope.metadata.correlation_id or message.correlation_id,
            causation_id=envelope.metadata.causation_id,
            event_id=str(envelope.event_id),
            event_type=envelope.type,
            aggregate_id=key,
            version=envelope.version,
            position=envelope.position,
        ):
            previous, turn = self._lanes.join(key)
            try:
                if previous is not None:
                    await previous.wait()
                if self._lanes.must_requeue(key, turn):
                    # Projecting it now would jump ahead of a requeued earlier event.
                    log.info("event_requeued_behind_earlier_event")
                    await self._settle(message, requeue=True)
                else:
                    await self._project(message, envelope, key)
            except asyncio.CancelledError:
                # Unsettled, so the channel close requeues it; its successors must follow it.
                self._lanes.hold_back(key)
                raise
            finally:
                self._lanes.leave(key, turn)

    async def _project(
        self, message: AbstractIncomingMessage, envelope: EventEnvelope, key: str
    ) -> None:
        if self._handed_back(message):
            log.info("event_left_to_the_next_consumer")
            return
        with tracing.span(
            f"project {envelope.type}",
            parent=_trace_of(message, envelope),
            kind="consumer",
            attributes={
                "cqrs.event_id": str(envelope.event_id),
                "cqrs.event_type": envelope.type,
                "cqrs.aggregate_id": key,
                "cqrs.version": envelope.version,
                "cqrs.position": envelope.position,
            },
        ) as span:
            span.set("cqrs.outcome", await self._project_traced(message, envelope, key))

    async def _project_traced(
        self, message: AbstractIncomingMessage, envelope: EventEnvelope, key: str
    ) -> str:
        """Project and settle; returns the outcome for the span."""
        try:
            outcome = await self._with_retries(envelope)
        except self._retry_policy.transient_errors as e:
            log.warning("event_requeued_after_transient_errors", error=repr(e))
            await self._requeue(message, key)
            return "requeued"
        except Exception as e:
            # A bug or an unexpected store error must not kill the consumer nor loop forever:
            # the message is parked with the error, and the traceback goes to the log.
            log.exception("projection_failed")
            await self._park(message, f"projection failed: {type(e).__name__}: {e}", key)
            return "parked"

        match outcome:
            case Projected(applied=applied, duplicates=duplicates):
                if not await self._settle(message):
                    self._lanes.hold_back(key)
                    return "handed_back"
                elif applied:
                    self.metrics.count_projected(envelope.type, envelope.recorded_at)
                    log.debug("event_projected", projections=list(applied))
                    return "projected"
                elif duplicates:
                    self.metrics.duplicates += 1
                    log.debug("event_duplicate_ignored", projections=list(duplicates))
                    return "duplicate"
                else:
                    log.debug("event_not_projected")  # no read model wants it
                    return "not_projected"
            case Rejected(reason=reason):
                await self._park(message, reason, key)
                return "parked"

    async def _with_retries(self, envelope: EventEnvelope) -> Outcome:
        policy = self._retry_policy
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds),
            retry=retry_if_exception_type(policy.transient_errors),
            before_sleep=_log_retry,
            reraise=True,
        )
        outcome: Outcome = await retrying(self._handler, envelope)
        return outcome

    async def _park(
        self, message: AbstractIncomingMessage, reason: str, key: str | None = None
    ) -> None:
        if self._handed_back(message):
            # Another replica got it back from the broker and decides for itself.
            log.info("event_not_parked_channel_gone", reason=reason)
            return
        try:
            await self._parker.park(message, reason)
        except ParkedQueueFullError as e:
            self.metrics.park_refused += 1
            log.error(
                "event_not_parked_queue_full",
                reason=reason,
                error=str(e),
                retry_seconds=self._park_retry_seconds,
                park_refused_total=self.metrics.park_refused,
            )
            # Held before it goes back: the queue refuses until someone makes room, and an
            # immediate requeue would spin on it. Its aggregate's later events wait behind it.
            await asyncio.sleep(self._park_retry_seconds)
            await self._requeue(message, key)
            return
        except CONNECTION_EXCEPTIONS as e:
            log.error("event_park_failed", reason=reason, error=repr(e))
            await self._requeue(message, key)
            return
        self.metrics.parked += 1
        self.metrics.last_parked_reason = reason
        log.error("event_parked", reason=reason, parked_total=self.metrics.parked)
        if not await self._settle(message) and key is not None:
            self._lanes.hold_back(key)

    async def _requeue(self, message: AbstractIncomingMessage, key: str | None) -> None:
        self.metrics.requeued += 1
        # Hold back first: a redelivery cannot arrive before the nack is sent.
        if key is not None:
            self._lanes.hold_back(key)
        await self._settle(message, requeue=True)

    async def _settle(
        self, message: AbstractIncomingMessage, *, requeue: bool | None = None
    ) -> bool:
        """Ack (or nack with `requeue`); `False` when the message's channel is gone.

        Nothing is sent on a channel that is being handed over: a frame arriving on a channel the
        broker has closed makes it close the whole connection.
        """
        if self._handed_back(message):
            return False
        try:
            if requeue is None:
                await message.ack()
            else:
                await message.nack(requeue=requeue)
        except CONNECTION_EXCEPTIONS as e:
            # The channel is gone; the broker redelivers the message and the guard dedups it.
            log.warning("message_settle_failed", error=repr(e))
            return False
        return True

    def release(self, name: str, channel: object) -> None:
        """`channel` (the driver's channel of queue `name`) is about to close: leave it alone."""
        self.forget(name)
        self._released.add(channel)

    def _handed_back(self, message: AbstractIncomingMessage) -> bool:
        """Whether its channel is closed or closing: the broker requeues it for another consumer."""
        channel = getattr(message, "channel", None)
        if channel is None:
            return False
        return channel in self._released or bool(getattr(channel, "is_closed", False))


def _trace_of(message: AbstractIncomingMessage, envelope: EventEnvelope) -> Context | None:
    """The trace of the command that produced the event, as stored with it (the relay also
    sends it as a header, for consumers that do not read the body)."""
    if not tracing.enabled():
        return None
    carrier = dict(message.headers or {})
    if envelope.metadata.traceparent is not None:
        carrier[tracing.TRACEPARENT] = envelope.metadata.traceparent
    return tracing.extract(carrier)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.warning("transient_error_retrying", attempt=state.attempt_number, error=repr(error))
