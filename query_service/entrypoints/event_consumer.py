"""The projector's AMQP consumer and its acknowledgement policy.

- unreadable body (too large, bad JSON, not an event envelope), data failing its schema, a
  version gap that does not close: park with the reason, ack; never block the queue;
- an event no projection handles: ack, nothing to do;
- transient MongoDB errors: retry with bounded backoff, then nack with requeue;
- any other error: log it with its traceback and park the message, so nothing is lost;
- the parked queue full (it refuses rather than drops): hold the message a while, then requeue
  it, so it stays in its partition until an operator makes room;
- ack only after the read-model write is done.

The deliveries go through the consumer pipeline (`cqrs_runtime.pipeline`) in micro-batches:
per partition queue, one batch at a time, made of the deliveries ready when the previous one is
done (up to `batch_size`). A lone delivery is projected at once; under load the deliveries that
arrive meanwhile make the next batch, projected in few writes (see `Projector.project_batch`).
This module says what is the projector's own (how a delivery is decoded, its log fields and
span, the lanes that admit it, the policy above, how each outcome is settled on the broker, and
what is counted). The acks of a batch go in one `multiple` ack per channel once its outcomes
are settled; parks and requeues are settled one by one before it.

Each delivery runs in a task of the driver's; the first of a queue's to find no batch running
runs the batches while others wait for theirs. Whatever escapes the policy above (a failure to
park or settle that is not an outage) is contained here: logged, counted against the partition
in the supervisor's table (readiness names a partition that keeps failing), and the batch's
unsettled messages are requeued after a pause, never lost and never acked unprojected.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, ConsumerTag
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError

from cqrs_runtime import pipeline, tracing
from cqrs_runtime.pipeline import Decided, Item, Pipeline, Policy, Retry, SpanSpec, Verdict
from cqrs_runtime.supervision import Supervisor
from query_service.adapters.broker import ParkedQueueFullError
from query_service.entrypoints.lanes import AggregateLanes, Turn
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
BatchHandler = Callable[[Sequence[EventEnvelope]], Awaitable[Sequence[Outcome]]]
Delivery = Item[AbstractIncomingMessage, EventEnvelope]
Decision = pipeline.Outcome[Projected]

# What becomes of a delivery besides the outcomes of projecting it.
BEHIND = "behind_earlier_event"  # requeued: projecting it now would overtake a requeued event
LEFT = "left_to_next_consumer"  # its channel is being handed over: the broker requeues it
HANDED_BACK = "handed_back"  # projected, but the ack did not reach the broker


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

DEFAULT_BATCH_SIZE = 64
# One: a partition's batches one after another, so that a failed batch is requeued before
# anything delivered after it is handled. More let other aggregates go on while a batch waits
# out a version gap, but the failures of two batches of one aggregate then race each other.
DEFAULT_BATCHES_IN_FLIGHT = 1


class _Waiting:
    """A delivery waiting in its queue's line for the batch it will be part of."""

    __slots__ = ("done", "message")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self.message = message
        # True: its batch is done; False: no batch runs any more, it runs the next ones.
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


@dataclass
class _Line:
    """A queue's deliveries waiting for a batch, and whether a batch is running."""

    waiting: list[_Waiting]
    running: int = 0  # batches running


class ProjectorConsumer:
    """Consumes the projector's partition queues and settles each message by the ack policy.

    Each queue's deliveries are projected in batches of up to `batch_size`, one batch at a time
    (see the module's docstring), by `batch_handler` (else one by one by `handler`). Messages of
    one aggregate are handled in delivery order; the lanes (see `lanes`) keep a requeued
    message from being overtaken by its successors, also across a channel's handover.
    """

    def __init__(
        self,
        *,
        handler: EventHandler,
        parker: Parker,
        batch_handler: BatchHandler | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        max_body_bytes: int = MAX_BODY_BYTES,
        metrics: ProjectorMetrics | None = None,
        supervisor: Supervisor | None = None,
        park_retry_seconds: float = 5.0,
    ) -> None:
        self.metrics = metrics if metrics is not None else ProjectorMetrics()
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._handler = handler
        self._batch_handler = batch_handler
        self._batch_size = max(1, batch_size)
        self._batches_in_flight = max(1, batches_in_flight)
        self._lines: dict[str, _Line] = {}
        self._arrived: dict[int, int] = {}  # id of a message in line -> its arrival number
        # Per channel, the delivery tags of the messages in line or in a batch.
        self._in_hand: dict[int, set[int]] = {}
        # The channel each message in hand came on, read when it arrived: aio-pika's
        # `message.channel` raises once the channel is closed, and the bookkeeping of a
        # channel that closed under a batch must still be undone.
        self._channels: dict[int, object] = {}
        # Per channel, the acked messages of the batch being settled, acked at its end.
        self._acks: dict[int, list[Delivery]] = {}
        self._parker = parker
        self._park_retry_seconds = park_retry_seconds
        self._max_body_bytes = max_body_bytes
        self._lanes = AggregateLanes()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._consumers: dict[str, tuple[AbstractQueue, ConsumerTag]] = {}
        self._queue_of_tag: dict[str, str] = {}
        self._last_delivery: dict[str, float] = {}
        self._released: weakref.WeakSet[object] = weakref.WeakSet()
        self._pipeline: Pipeline[AbstractIncomingMessage, EventEnvelope, Projected] = Pipeline(
            decode=self._decode,
            log_fields=_log_fields,
            gate=self._admit,
            span=_span,
            handle=self._project,
            policy=Policy(
                retry=Retry(
                    transient=retry_policy.transient_errors,
                    attempts=retry_policy.attempts,
                    initial_seconds=retry_policy.initial_seconds,
                    max_seconds=retry_policy.max_seconds,
                    announce=_log_retry,
                ),
                exhausted=_requeue_after_retries,
                failed=_park_failure,
            ),
            settle=self._settle_decision,
            span_outcome=_span_outcome,
            record=self._record,
        )

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
            await self._take_turn(queue or "projector", message)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _take_turn(self, queue: str, message: AbstractIncomingMessage) -> None:
        """Wait for the batch `message` is part of; run batches if fewer than
        `batches_in_flight` of its queue are running."""
        # Synchronous up to the wait: the line is in delivery order.
        line = self._lines.setdefault(queue, _Line([]))
        waiting = _Waiting(message)
        line.waiting.append(waiting)
        self._arrived[id(message)] = self._lanes.arrive()
        channel = _open_channel(message)
        if channel is not None:
            self._channels[id(message)] = channel
            self._in_hand.setdefault(id(channel), set()).add(_tag(message))
        if line.running >= self._batches_in_flight:
            try:
                if await waiting.done:
                    return  # its batch is done
            except asyncio.CancelledError:
                handed = waiting.done.done() and not waiting.done.cancelled()
                if handed and waiting.done.result() is False:
                    # Handed the running of batches just as it was cancelled: pass it on.
                    self._hand_over(queue, line)
                raise
        else:
            line.running += 1
        try:
            while line.waiting:
                batch = [w.message for w in line.waiting[: self._batch_size]]
                done, line.waiting = line.waiting[: len(batch)], line.waiting[len(batch) :]
                try:
                    await self._run_batch(queue, batch)
                finally:
                    for finished in done:
                        self._out_of_hand(finished.message)
                        if not finished.done.done():
                            finished.done.set_result(True)
                    self._lanes.release_holds(min(self._arrived.values(), default=None))
        finally:
            self._hand_over(queue, line)

    def _out_of_hand(self, message: AbstractIncomingMessage) -> None:
        self._arrived.pop(id(message), None)
        channel = self._channels.pop(id(message), None)
        if channel is not None:
            tags = self._in_hand.get(id(channel))
            if tags is not None:
                tags.discard(_tag(message))
                if not tags:
                    del self._in_hand[id(channel)]

    def _hand_over(self, queue: str, line: _Line) -> None:
        """A runner of batches stops (nothing left, or cancelled): the next delivery in line,
        if any, runs them from here; one whose task was cancelled is left unsettled (the
        channel's close requeues it)."""
        while line.waiting:
            first = line.waiting[0]
            if not first.done.done():
                first.done.set_result(False)
                return
            self._out_of_hand(first.message)
            del line.waiting[0]
        line.running -= 1
        if not line.running and self._lines.get(queue) is line:
            del self._lines[queue]

    async def _run_batch(self, queue: str, messages: Sequence[AbstractIncomingMessage]) -> None:
        acked: set[int] = set()
        try:
            try:
                await self._handle(messages)
            finally:
                acked = await self._send_acks(messages)
        except CONNECTION_EXCEPTIONS as e:
            # The channel is gone: the broker redelivers what was not settled.
            log.warning("projector_batch_lost_channel", error=repr(e))
        except Exception as e:  # noqa: BLE001 - logged and counted by the supervisor
            self._supervisor.outcome(queue, e)
            unsettled = [m for m in messages if not m.processed and id(m) not in acked]
            if unsettled:  # it failed before they were settled
                await self._requeue_after_pause(unsettled)
        else:
            self._supervisor.outcome(queue, None)

    async def _requeue_after_pause(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Requeue `messages` after a pause, their aggregates' lanes held meanwhile: what comes
        of those aggregates waits, and is requeued behind them (see `lanes`)."""
        keys = [_key_of(message) for message in messages]
        turns = {key: self._lanes.join(key)[1] for key in keys if key is not None}
        try:
            await asyncio.sleep(FAILED_REQUEUE_PAUSE_SECONDS)
            for message, key in zip(messages, keys, strict=True):
                await self._requeue(message, key)
        finally:
            for key, turn in turns.items():
                self._lanes.leave(key, turn)

    async def _handle(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        await self._pipeline.run(messages)

    async def _send_acks(self, batch: Sequence[AbstractIncomingMessage]) -> set[int]:
        """Ack the batch's projected messages: one `multiple` ack per channel for those below
        every other message in hand on it (a `multiple` ack covers every unsettled delivery up
        to its tag; the batch's parked and requeued ones were settled one by one before), the
        rest one by one. Returns the ids of the messages acked."""
        ours = {id(message) for message in batch}
        acked: set[int] = set()
        for channel_id in list(self._acks):
            waiting = self._acks[channel_id]
            deliveries = [d for d in waiting if id(d.message) in ours]
            if not deliveries:
                continue  # another batch's (of another queue, or running alongside)
            rest = [d for d in waiting if id(d.message) not in ours]
            if rest:
                self._acks[channel_id] = rest
            else:
                del self._acks[channel_id]
            others = self._in_hand.get(channel_id, set()) - {
                _tag(m) for m in batch if id(self._channels.get(id(m))) == channel_id
            }
            below = min(others, default=None)
            covered = [d for d in deliveries if below is None or _tag(d.message) < below]
            settled: list[Delivery] = []
            if covered and await self._settle(covered[-1].message, multiple=len(covered) > 1):
                settled.extend(covered)
            for delivery in deliveries[len(covered) :]:
                if await self._settle(delivery.message):
                    settled.append(delivery)
            for delivery in deliveries:
                if delivery in settled:
                    acked.add(id(delivery.message))
                elif delivery.decoded is not None:
                    self._lanes.hold_back(str(delivery.decoded.aggregate_id))
        return acked

    # --- what the pipeline asks of this consumer ---------------------------------------------

    def _decode(self, message: AbstractIncomingMessage) -> EventEnvelope:
        headers = dict(message.headers or {})
        try:
            return parse_envelope(message.body, headers, max_bytes=self._max_body_bytes)
        except UnreadableMessage as e:
            raise Decided(pipeline.Outcome.park("parked", str(e))) from e

    @contextlib.asynccontextmanager
    async def _admit(self, batch: Sequence[Delivery]) -> AsyncIterator[list[Decision | None]]:
        """Each aggregate's lane: its events one after another, in delivery order."""
        # Synchronous up to the joins: tasks start in delivery order, and that order is the
        # lane order only if no task yields before joining.
        turns: dict[str, tuple[Turn | None, Turn]] = {}
        for delivery in batch:
            key = str(delivery.value.aggregate_id)
            if key not in turns:
                turns[key] = self._lanes.join(key, self._arrived.get(id(delivery.message)))
        try:
            for previous, _ in turns.values():
                if previous is not None:
                    await previous.wait()
            yield [self._admission(delivery, turns) for delivery in batch]
        except asyncio.CancelledError:
            # Unsettled, so the channel close requeues it; its successors must follow it.
            for key in turns:
                self._lanes.hold_back(key)
            raise
        finally:
            for key, (_, turn) in turns.items():
                self._lanes.leave(key, turn)

    def _admission(
        self, delivery: Delivery, turns: Mapping[str, tuple[Turn | None, Turn]]
    ) -> Decision | None:
        key = str(delivery.value.aggregate_id)
        if self._lanes.must_requeue(key, turns[key][1], self._arrived.get(id(delivery.message))):
            return pipeline.Outcome.requeue(BEHIND)
        if self._handed_back(delivery.message):
            return pipeline.Outcome.requeue(LEFT)
        return None

    async def _project(self, batch: Sequence[Delivery]) -> list[Decision]:
        if self._batch_handler is not None:
            outcomes = list(await self._batch_handler([delivery.value for delivery in batch]))
        else:
            outcomes = []
            for delivery in batch:
                with delivery.scope():
                    outcomes.append(await self._handler(delivery.value))
        decisions: list[Decision] = []
        for outcome in outcomes:
            match outcome:
                case Projected(applied=applied, duplicates=duplicates):
                    status = (
                        "projected" if applied else "duplicate" if duplicates else "not_projected"
                    )
                    decisions.append(pipeline.Outcome.ack(status, outcome))
                case Rejected(reason=reason):
                    decisions.append(pipeline.Outcome.park("parked", reason))
        return decisions

    async def _settle_decision(self, delivery: Delivery, decision: Decision) -> Decision:
        message = delivery.message
        event = delivery.decoded
        key = str(event.aggregate_id) if event is not None else None
        if decision.verdict is Verdict.ACK:
            channel = self._channels.get(id(message))
            if channel is not None and not self._handed_back(message):
                # Acked with the batch's others at its end (`_send_acks`).
                self._acks.setdefault(id(channel), []).append(delivery)
            elif not await self._settle(message):
                if key is not None:
                    self._lanes.hold_back(key)
                return pipeline.Outcome.requeue(HANDED_BACK)
            projected = decision.result
            if decision.status == "projected" and projected is not None:
                log.debug("event_projected", projections=list(projected.applied))
            elif decision.status == "duplicate" and projected is not None:
                log.debug("event_duplicate_ignored", projections=list(projected.duplicates))
            else:
                log.debug("event_not_projected")  # no read model wants it
        elif decision.verdict is Verdict.PARK:
            await self._park(message, decision.reason or decision.status, key)
        elif decision.status == BEHIND:
            log.info("event_requeued_behind_earlier_event")
            await self._settle(message, requeue=True)
        elif decision.status == LEFT:
            log.info("event_left_to_the_next_consumer")
        elif decision.verdict is Verdict.REQUEUE:
            await self._requeue(message, key)
        else:
            raise ValueError(f"the projector does not settle {decision.verdict}")
        return decision

    def _record(self, delivery: Delivery, decision: Decision, seconds: float) -> None:
        event = delivery.decoded
        if event is None:
            return
        if decision.status == "projected":
            self.metrics.count_projected(event.type, event.recorded_at)
        elif decision.status == "duplicate":
            self.metrics.duplicates += 1

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
        self,
        message: AbstractIncomingMessage,
        *,
        requeue: bool | None = None,
        multiple: bool = False,
    ) -> bool:
        """Ack (or nack with `requeue`), with those before it on its channel when `multiple`;
        `False` when the message's channel is gone.

        Nothing is sent on a channel that is being handed over: a frame arriving on a channel the
        broker has closed makes it close the whole connection.
        """
        if self._handed_back(message):
            return False
        try:
            if requeue is None:
                await message.ack(multiple=multiple)
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
        channel = self._channels.get(id(message))
        if channel is None:
            try:
                channel = getattr(message, "channel", None)
            except ChannelInvalidStateError:
                return True  # closed already
        if channel is None:
            return False
        return channel in self._released or bool(getattr(channel, "is_closed", False))


def _key_of(message: AbstractIncomingMessage) -> str | None:
    """The aggregate id the message's partition header names, if it is one."""
    key = _as_uuid((message.headers or {}).get(AGGREGATE_ID_HEADER))
    return str(key) if key is not None else None


def _open_channel(message: AbstractIncomingMessage) -> object | None:
    """The channel `message` came on; None when it is closed already (or a fake has none)."""
    try:
        return getattr(message, "channel", None)
    except ChannelInvalidStateError:
        return None


def _tag(message: AbstractIncomingMessage) -> int:
    return message.delivery_tag or 0


def _trace_of(message: AbstractIncomingMessage, envelope: EventEnvelope) -> Context | None:
    """The trace of the command that produced the event, as stored with it (the relay also
    sends it as a header, for consumers that do not read the body)."""
    if not tracing.enabled():
        return None
    carrier = dict(message.headers or {})
    if envelope.metadata.traceparent is not None:
        carrier[tracing.TRACEPARENT] = envelope.metadata.traceparent
    return tracing.extract(carrier)


def _log_fields(message: AbstractIncomingMessage, event: EventEnvelope | None) -> dict[str, Any]:
    if event is None:
        aggregate_id = _as_uuid((message.headers or {}).get(AGGREGATE_ID_HEADER))
        return {
            "correlation_id": message.correlation_id,
            "message_id": message.message_id,
            "routing_key": message.routing_key,
            "aggregate_id": str(aggregate_id) if aggregate_id else None,
        }
    return {
        "correlation_id": event.metadata.correlation_id or message.correlation_id,
        "causation_id": event.metadata.causation_id,
        "event_id": str(event.event_id),
        "event_type": event.type,
        "aggregate_id": str(event.aggregate_id),
        "version": event.version,
        "position": event.position,
    }


def _span(message: AbstractIncomingMessage, event: EventEnvelope | None) -> SpanSpec | None:
    if event is None:
        return None  # started once the event is handed to the projections
    return SpanSpec(
        f"project {event.type}",
        parent=_trace_of(message, event),
        kind="consumer",
        attributes={
            "cqrs.event_id": str(event.event_id),
            "cqrs.event_type": event.type,
            "cqrs.aggregate_id": str(event.aggregate_id),
            "cqrs.version": event.version,
            "cqrs.position": event.position,
        },
    )


def _span_outcome(decision: Decision) -> Mapping[str, tracing.AttributeValue | None]:
    return {"cqrs.outcome": decision.status}


def _log_retry(attempt: int, error: BaseException) -> None:
    log.warning("transient_error_retrying", attempt=attempt, error=repr(error))


def _requeue_after_retries(delivery: Delivery, decision: Decision) -> Decision:
    log.warning("event_requeued_after_transient_errors", error=repr(decision.error))
    return pipeline.Outcome.requeue("requeued", decision.reason, error=decision.error)


def _park_failure(delivery: Delivery, error: Exception) -> Decision:
    """A bug or an unexpected store error must not kill the consumer nor loop forever: the
    message is parked with the error, and the traceback goes to the log."""
    if delivery.decoded is None:
        raise error  # not the projection's: contained around the delivery (`on_message`)
    log.error("projection_failed", exc_info=error)
    return pipeline.Outcome.park("parked", f"projection failed: {type(error).__name__}: {error}")
