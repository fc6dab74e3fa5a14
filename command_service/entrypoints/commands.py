"""The AMQP command consumer: one sequential loop per partition queue, in batches.

Each round takes the deliveries that are there already, up to the batch size (never waiting
for more: a lone command is handled at once), and hands them to the service layer's batch use
case (`handle_commands`: decided in order, stored in one transaction). A batch that cannot be
stored as one (another writer came first) or whose handling raises anything but an outage is
handled again one command at a time (`handle_command`), so the policy below applies to each
command on its own. The replies of a batch are published together, dead letters confirmed, and
then the batch is acked at once (`multiple`).

Acknowledgement policy:
- bad input (oversized body, wrong content type, malformed JSON, unknown type, schema
  violation, a string that may not travel, an `aggregate_id` header that is not the envelope's,
  a `user_id` that is no identifier)
  → a copy goes to the dead-letter exchange with the reason in `x-cqrs-reason`, a rejection is
  replied when the sender asked for replies, and the original is acked;
- a domain rule violation → a normal `rejected` reply, stored for idempotency, acked;
- the event store unreachable → retried with backoff, in place (so the partition keeps its
  order), then the partition's channel is closed, which returns this command and every later one
  delivered meanwhile to the queue in their order, and consumption resumes after a pause; never
  acked early;
- anything else the handling raises → the command is dead-lettered with `internal_error` (the
  traceback goes to the log), replied, acked, and the partition goes on: no single message can
  stop it;
- otherwise → acked only after the events and the reply committed.

The sender is the message's AMQP `user_id` property: RabbitMQ refuses a publish whose `user_id`
is not the connection's login, so it is the verified login (a message without it is anonymous).
It is handed to the service layer as the command's `Actor`; the envelope's `metadata.user` is
what the sender claims and is trusted for nothing.

Replies go only to reply queues: server-named ones (`amq.gen-*`), direct reply-to
(`amq.rabbitmq.reply-to`) and the configured prefix (the SDK's `cqrs.reply.`); a command naming
any other `reply_to` is handled without a reply, since replies are published with the command
service's rights and must not land in queues the client could not write to.

Each message goes through the consumer pipeline (`cqrs_runtime.pipeline`): this module says what
is the command consumer's own (how a delivery is decoded, its log fields and span, the policy
above, how each outcome is settled on the broker, and what is counted), the pipeline runs the
stages. Each partition loop runs under the service's supervisor: if the loop itself fails (not
one message: those are contained above), it is logged, counted and restarted with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import structlog
from aio_pika.abc import (
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pydantic import ValidationError

from command_service.adapters.broker import dead_letter_message, reply_message
from command_service.adapters.subscription import BROKER_ERRORS
from command_service.metrics import CommandMetrics
from command_service.model.authorization import Actor
from command_service.service_layer.event_store import EventStoreError, EventStoreUnavailableError
from command_service.service_layer.handlers import BatchCommand, HandleCommand, HandleCommands
from command_service.service_layer.registry import (
    CommandRegistry,
    ParsedCommand,
    UnknownCommandError,
)
from cqrs_runtime import tracing
from cqrs_runtime.pipeline import Decided, Item, Outcome, Pipeline, Policy, Retry, SpanSpec, Verdict
from cqrs_runtime.supervision import Supervisor, mark_healthy
from shared.messages import CommandEnvelope, Reply, ReplyError
from shared.text import is_identifier
from shared.topology import AGGREGATE_ID_HEADER, REPLY_QUEUE_PREFIX

log = structlog.get_logger(__name__)

NIL_UUID = UUID(int=0)
JSON_CONTENT_TYPES = {None, "", "application/json"}
# Server-named queues and direct reply-to: what the broker itself names for a client.
BROKER_REPLY_QUEUE_PREFIXES = ("amq.gen-", "amq.rabbitmq.reply-to")
# How long a partition whose event store stayed away waits before it consumes again.
PAUSE_SECONDS = 1.0
INTERNAL_ERROR_REPLY = (
    "the command could not be processed; it was set aside (dead-lettered) for an operator"
)


class BadCommandError(Exception):
    """A message that can never be processed; it goes to the dead letters.

    `message` is the reason recorded with the dead letter; `reply` what the sender is told,
    when that must say less (an internal error's details are for the operator).
    """

    def __init__(
        self,
        code: str,
        message: str,
        envelope: CommandEnvelope | None = None,
        *,
        reply: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.envelope = envelope
        self.reply = reply if reply is not None else message


class PartitionPausedError(Exception):
    """The event store stayed away past the retry window: the partition's consumer lets go of
    everything it holds (returned to the queue in order) and consumes again after a pause."""


@dataclass(frozen=True)
class ReceivedCommand:
    """A command as it came from the broker: parsed, and who sent it."""

    parsed: ParsedCommand
    actor: Actor

    @property
    def envelope(self) -> CommandEnvelope:
        return self.parsed.envelope


Delivery = Item[AbstractIncomingMessage, ReceivedCommand]


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class CommandConsumer:
    """Consumes the partition queues and hands each command to the service layer.

    Each partition is consumed on a channel of its own, opened when consumption starts and
    closed when it stops. A closed channel is never restored by the robust connection, so a
    partition given up while the broker was unreachable does not get its consumer back when
    the connection returns (it would hold the partition's single-active-consumer slot with
    nobody reading it).
    """

    def __init__(
        self,
        *,
        connection: AbstractConnection,
        prefetch: int,
        handle: HandleCommand,
        registry: CommandRegistry,
        handle_batch: HandleCommands | None = None,
        batch_size: int = 1,
        replies: AbstractExchange,
        dead_letters: AbstractExchange,
        max_message_bytes: int,
        transient_retry_seconds: float = 30.0,
        metrics: CommandMetrics | None = None,
        supervisor: Supervisor | None = None,
        reply_queue_prefix: str = REPLY_QUEUE_PREFIX,
    ) -> None:
        self._metrics = metrics if metrics is not None else CommandMetrics(registry.command_types)
        self._connection = connection
        self._prefetch = prefetch
        self._handle_command = handle
        self._handle_batch = handle_batch
        # Never more than the channel may hold unacked.
        self._batch_size = max(1, min(batch_size, prefetch))
        self._registry = registry
        self._replies = replies
        self._dead_letters = dead_letters
        self._max_message_bytes = max_message_bytes
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._reply_prefixes = (*BROKER_REPLY_QUEUE_PREFIXES, reply_queue_prefix)
        self._partitions: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self.handled = 0
        self.largest_batch = 0  # the most deliveries handled together so far
        self._pipeline: Pipeline[AbstractIncomingMessage, ReceivedCommand, Reply] = Pipeline(
            decode=self._decode,
            log_fields=_log_fields,
            span=_span,
            handle=self._handle,
            policy=Policy(
                # The event store unreachable: retried in place, so the partition keeps its order.
                retry=Retry(
                    transient=(EventStoreUnavailableError,),
                    attempts=None,
                    seconds=transient_retry_seconds,
                    initial_seconds=0.1,
                    max_seconds=5.0,
                    announce=_announce_unavailable,
                ),
                exhausted=_requeue,
                failed=self._failed,
            ),
            settle=self._settle,
            span_outcome=_span_outcome,
            record=self._record,
        )

    def start_partition(self, name: str) -> None:
        """Consume one partition queue, a batch at a time, under the supervisor."""
        stop = asyncio.Event()
        supervised = self._supervisor.spawn(name, lambda: self._consume(name, stop))
        self._partitions[name] = (stop, supervised.task)

    async def stop_partition(self, name: str, timeout: float = 10.0) -> None:
        """Stop consuming a partition after the batch in hand is finished.

        Messages delivered but not yet processed go back to the queue (they were never acked),
        so whoever consumes the partition next sees them first, in order.
        """
        entry = self._partitions.pop(name, None)
        if entry is None:
            return
        stop, task = entry
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._supervisor.forget(name)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop every partition."""
        await asyncio.gather(*(self.stop_partition(n, timeout) for n in list(self._partitions)))

    @property
    def partitions(self) -> list[str]:
        return sorted(self._partitions)

    async def _consume(self, name: str, stop: asyncio.Event) -> None:
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                try:
                    await self._consume_until(name, stopped)
                except BROKER_ERRORS as e:
                    # The channel went away: unacked messages return to the queue; consume
                    # again, on a new channel, once the robust connection is back.
                    log.warning("partition_consumer_interrupted", queue=name, error=repr(e))
                    await asyncio.wait({stopped}, timeout=1.0)
                except PartitionPausedError:
                    log.warning("partition_paused", queue=name, pause_seconds=PAUSE_SECONDS)
                    await asyncio.wait({stopped}, timeout=PAUSE_SECONDS)
        finally:
            stopped.cancel()

    async def _consume_until(self, name: str, stopped: asyncio.Task[bool]) -> None:
        connected = asyncio.ensure_future(self._connection.ready())
        await asyncio.wait({connected, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not connected.done():
            connected.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connected
            return
        try:
            channel = await self._connection.channel()
        except RuntimeError as e:  # the connection went away again just now
            raise ConnectionError(str(e)) from e
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.declare_queue(name, passive=True)
            await self._consume_queue(queue, stopped)
        finally:
            # Closed (even while the connection is down) means never restored.
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()

    async def _consume_queue(self, queue: AbstractQueue, stopped: asyncio.Task[bool]) -> None:
        async with queue.iterator() as messages:
            iterator = aiter(messages)
            receive: asyncio.Future[AbstractIncomingMessage] | None = None
            try:
                while not stopped.done():
                    if receive is None:
                        receive = asyncio.ensure_future(anext(iterator))
                    waiting: set[asyncio.Future[Any]] = {receive, stopped}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if not receive.done():
                        return
                    batch: list[AbstractIncomingMessage] = []
                    ended = False
                    # What is delivered already joins the batch; nothing is waited for.
                    while receive is not None and receive.done():
                        try:
                            batch.append(receive.result())
                        except StopAsyncIteration:
                            ended = True  # the consumer was cancelled by the broker
                        receive = None
                        if ended or len(batch) >= self._batch_size:
                            break
                        receive = asyncio.ensure_future(anext(iterator))
                        await asyncio.sleep(0)  # one turn: done by then if one is buffered
                    if batch:
                        await self.process_batch(batch)
                        mark_healthy()
                    if ended:
                        return  # consume again
            finally:
                if receive is not None and not receive.done():
                    receive.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await receive

    async def process(self, message: AbstractIncomingMessage) -> None:
        """Handle one delivery to its end: acked, dead-lettered or requeued."""
        await self.process_batch([message])

    async def process_batch(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Handle deliveries of one partition, in their order, to their end: replies sent,
        dead letters confirmed, then all acked at once (or the partition paused, see below)."""
        self.largest_batch = max(self.largest_batch, len(messages))
        self._metrics.command_batch_size.observe(len(messages))
        settling = _Settling()
        token = _SETTLING.set(settling)
        try:
            outcomes = await self._pipeline.run(messages)
        except BaseException:
            settling.abandon()  # nothing is acked: the channel's close returns them all
            raise
        finally:
            _SETTLING.reset(token)
        await settling.finish()
        for outcome in outcomes:
            if outcome.verdict is Verdict.REQUEUE:
                # Not a nack of this one message: the next ones are delivered here already and
                # would be handled before it came back. Closing the channel returns it and all
                # of them to the queue, in their order.
                raise PartitionPausedError(outcome.reason) from outcome.error

    # --- what the pipeline asks of this consumer ---------------------------------------------

    def _decode(self, message: AbstractIncomingMessage) -> ReceivedCommand:
        try:
            envelope = self._read(message)
            parsed = self._parse(message, envelope)
            return ReceivedCommand(parsed, _sender(message, envelope))
        except BadCommandError as e:
            # What could be read of it names it in the log and in the metrics.
            fields = _log_fields(message, None)
            if e.envelope is not None:
                fields = {**fields, **_envelope_fields(e.envelope)}
            raise Decided(_dead_letter(message, e, "dead_lettered"), fields) from e

    def _read(self, message: AbstractIncomingMessage) -> CommandEnvelope:
        size = len(message.body)
        if size > self._max_message_bytes:
            raise BadCommandError(
                "message_too_large", f"body of {size} bytes exceeds {self._max_message_bytes}"
            )
        if message.content_type not in JSON_CONTENT_TYPES:
            raise BadCommandError(
                "unsupported_content_type",
                f"content type {message.content_type!r} is not application/json",
            )
        try:
            return CommandEnvelope.model_validate_json(message.body)
        except ValidationError as e:
            in_payload = all(error["loc"][:1] == ("payload",) for error in e.errors())
            code = "invalid_payload" if in_payload else "invalid_envelope"
            raise BadCommandError(code, _describe(e)) from e

    def _parse(self, message: AbstractIncomingMessage, envelope: CommandEnvelope) -> ParsedCommand:
        header = (message.headers or {}).get(AGGREGATE_ID_HEADER)
        # The partition was chosen by the header: one that lies would break the aggregate's order.
        if header is not None and header != str(envelope.aggregate_id):
            raise BadCommandError(
                "aggregate_id_mismatch",
                f"header {AGGREGATE_ID_HEADER} is not the envelope's aggregate_id "
                f"{envelope.aggregate_id} (lower-case UUID form)",
                envelope,
            )
        try:
            return self._registry.parse(envelope)
        except UnknownCommandError as e:
            raise BadCommandError("unknown_command_type", str(e), envelope) from e
        except ValidationError as e:
            raise BadCommandError("invalid_payload", _describe(e), envelope) from e

    async def _handle(self, batch: Sequence[Delivery]) -> list[Outcome[Reply]]:
        if len(batch) == 1:
            # Alone: what it raises is contained by the pipeline's policy.
            [delivery] = batch
            command = delivery.value
            reply = await self._handle_command(command.parsed, actor=command.actor)
            return [Outcome.ack(reply.status, reply)]
        if self._handle_batch is not None:
            try:
                replies = await self._handle_batch(
                    [BatchCommand(d.value.parsed, d.value.actor, scope=d.scope) for d in batch]
                )
            except EventStoreUnavailableError:
                raise  # the whole batch is retried in place, then handed back
            except Exception as e:  # noqa: BLE001 - nothing was stored: one at a time
                if isinstance(e, EventStoreError):
                    # Another writer came first: no one command's doing, so none is named.
                    structlog.contextvars.clear_contextvars()
                log.info("command_batch_split", size=len(batch), error=repr(e))
                self._metrics.command_batch_splits.inc()
            else:
                return [Outcome.ack(reply.status, reply) for reply in replies]
        return await self._one_at_a_time(batch)

    async def _one_at_a_time(self, batch: Sequence[Delivery]) -> list[Outcome[Reply]]:
        """Each command on its own, so that a conflict is retried as alone and a command
        whose handling raises is the only one dead-lettered."""
        outcomes: list[Outcome[Reply]] = []
        for delivery in batch:
            if outcomes and outcomes[-1].verdict is Verdict.RETRY:
                outcomes.append(outcomes[-1])  # after an outage: retried in their order
                continue
            with delivery.scope():
                command = delivery.value
                try:
                    reply = await self._handle_command(command.parsed, actor=command.actor)
                except EventStoreUnavailableError as e:
                    outcomes.append(Outcome.retry(e))
                    continue
                except Exception as e:  # noqa: BLE001 - contained per message
                    outcomes.append(self._failed(delivery, e))
                    continue
            outcomes.append(Outcome.ack(reply.status, reply))
        return outcomes

    def _failed(self, delivery: Delivery, error: Exception) -> Outcome[Reply]:
        """Anything else the handling raises: one message must not stop the partition."""
        log.error("command_failed", exc_info=error)
        envelope = delivery.decoded.envelope if delivery.decoded is not None else None
        failure = BadCommandError(
            "internal_error",
            f"{type(error).__name__}: {error}",
            envelope,
            reply=INTERNAL_ERROR_REPLY,
        )
        return _dead_letter(delivery.message, failure, "failed")

    async def _settle(self, delivery: Delivery, outcome: Outcome[Reply]) -> Outcome[Reply]:
        message = delivery.message
        if outcome.verdict is Verdict.REQUEUE:
            # Nothing is sent: `process_batch` closes the channel, which returns it.
            settling = _SETTLING.get()
            if settling is not None:
                settling.hand_back(message)
            return outcome
        reply = outcome.result
        if reply is None:
            raise ValueError(f"a command settled as {outcome.status} needs its reply")
        if outcome.verdict is Verdict.DEAD_LETTER:
            reason = outcome.reason or outcome.status
            log.warning("command_dead_lettered", reason=reason)
            # Confirmed before the batch is acked.
            await self._dead_letters.publish(
                dead_letter_message(message, reason, max_body_bytes=self._max_message_bytes),
                routing_key="",
            )
        else:
            log.debug(
                "command_handled",
                status=reply.status,
                version=reply.version,
                position=reply.position,
                error_code=reply.error.code if reply.error else None,
            )
        settling = _SETTLING.get()
        published = self._reply(message, reply)
        if settling is None:
            await published
            await message.ack()
        else:
            settling.add(message, published)
        return outcome

    def _record(self, delivery: Delivery, outcome: Outcome[Reply], seconds: float) -> None:
        settling = _SETTLING.get()
        if settling is not None:  # counted once acked with its batch
            settling.then(lambda: self._count(delivery, outcome, delivery.started))
        else:
            self._count(delivery, outcome, time.perf_counter() - seconds)

    def _count(self, delivery: Delivery, outcome: Outcome[Reply], started: float) -> None:
        if outcome.verdict is Verdict.ACK:
            self.handled += 1
        # The command type as far as it could be read (bound to the log with the envelope).
        self._metrics.settled(
            delivery.fields.get("command_type"), outcome.status, time.perf_counter() - started
        )

    async def _reply(self, message: AbstractIncomingMessage, reply: Reply) -> None:
        reply_to = message.reply_to
        if not reply_to:
            return
        if not reply_to.startswith(self._reply_prefixes):
            log.warning("reply_refused", reply_to=reply_to[:100], allowed=self._reply_prefixes)
            self._metrics.replies_refused.inc()
            return
        await self._replies.publish(
            reply_message(reply, message.correlation_id), routing_key=reply_to
        )


class _Settling:
    """A batch's replies in flight and its deliveries, to ack once every reply is sent."""

    def __init__(self) -> None:
        self._replies: list[asyncio.Future[None]] = []
        self._deliveries: list[tuple[AbstractIncomingMessage, bool]] = []  # (message, to ack)
        self._counts: list[Callable[[], None]] = []

    def add(self, message: AbstractIncomingMessage, reply: Awaitable[None]) -> None:
        # Started now (publishes go out in call order), awaited together.
        self._replies.append(asyncio.ensure_future(reply))
        self._deliveries.append((message, True))

    def then(self, count: Callable[[], None]) -> None:
        """Run `count` once the batch is settled."""
        self._counts.append(count)

    def hand_back(self, message: AbstractIncomingMessage) -> None:
        self._deliveries.append((message, False))

    def abandon(self) -> None:
        # Left to finish (cancelling one halfway could break the channel the partitions share
        # for replies); what they raise is of no further use.
        for reply in self._replies:
            reply.add_done_callback(_retrieve)

    async def finish(self) -> None:
        try:
            await asyncio.gather(*self._replies)
        except BaseException:
            self.abandon()
            raise
        prefix = 0  # the deliveries acked with one `multiple` ack: all before a hand-back
        while prefix < len(self._deliveries) and self._deliveries[prefix][1]:
            prefix += 1
        if prefix == 1:
            await self._deliveries[0][0].ack()
        elif prefix > 1:
            # Delivery tags grow in delivery order on the partition's channel.
            await self._deliveries[prefix - 1][0].ack(multiple=True)
        for message, to_ack in self._deliveries[prefix:]:
            if to_ack:
                await message.ack()
        for count in self._counts:
            count()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


_SETTLING: contextvars.ContextVar[_Settling | None] = contextvars.ContextVar(
    "command_settling", default=None
)


def _dead_letter(
    message: AbstractIncomingMessage, error: BadCommandError, status: str
) -> Outcome[Reply]:
    """Dead-letter it with the error's reason, and tell the sender it was rejected."""
    command_id = error.envelope.command_id if error.envelope else _uuid_or_nil(message.message_id)
    rejection = Reply(
        command_id=command_id,
        status="rejected",
        aggregate_id=error.envelope.aggregate_id if error.envelope else None,
        error=ReplyError(code=error.code, message=error.reply),
    )
    return Outcome.dead_letter(status, f"{error.code}: {error.message}", rejection)


def _announce_unavailable(attempt: int, error: BaseException) -> None:
    log.warning("event_store_unavailable", attempt=attempt)


def _requeue(delivery: Delivery, outcome: Outcome[Reply]) -> Outcome[Reply]:
    """The event store stayed away past the retry window: the partition lets go of it."""
    log.error("command_requeued", error=str(outcome.error))
    return Outcome.requeue("requeued", str(outcome.error), error=outcome.error)


def _log_fields(
    message: AbstractIncomingMessage, command: ReceivedCommand | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "message_id": message.message_id,
        "correlation_id": message.correlation_id,
    }
    if command is not None:
        fields.update(_envelope_fields(command.envelope))
        if command.actor.kind == "user":
            fields["user"] = command.actor.name
    return fields


def _envelope_fields(envelope: CommandEnvelope) -> dict[str, Any]:
    metadata = envelope.metadata
    fields: dict[str, Any] = {
        "command_id": str(envelope.command_id),
        "command_type": envelope.type,
        "aggregate_id": str(envelope.aggregate_id),
        "causation_id": metadata.causation_id,
    }
    if metadata.correlation_id is not None:  # else the message's own stays bound
        fields["correlation_id"] = metadata.correlation_id
    return fields


def _sender(message: AbstractIncomingMessage, envelope: CommandEnvelope) -> Actor:
    """Who sent the command: the broker-verified `user_id`, or nobody."""
    user_id = message.user_id
    if not user_id:
        return Actor.anonymous()
    # Verified equal to a login, but logins are not bound by what may travel (e.g. one from a
    # certificate's subject): such a name could not be stored or logged as it is.
    if not is_identifier(user_id):
        raise BadCommandError(
            "invalid_user_id",
            "the user_id property must be 1 to 128 printable ASCII characters, no spaces",
            envelope,
        )
    return Actor.user(user_id)


def _span(message: AbstractIncomingMessage, command: ReceivedCommand | None) -> SpanSpec:
    if command is None:
        # Renamed `command <Type>` once the type is known to be one of ours.
        return SpanSpec("command", parent=tracing.extract(message.headers), kind="consumer")
    envelope = command.envelope
    return SpanSpec(
        f"command {envelope.type}",
        attributes={
            "cqrs.command_id": str(envelope.command_id),
            "cqrs.command_type": envelope.type,
            "cqrs.aggregate_id": str(envelope.aggregate_id),
            "cqrs.correlation_id": envelope.metadata.correlation_id,
        },
    )


def _span_outcome(outcome: Outcome[Reply]) -> Mapping[str, tracing.AttributeValue | None]:
    reply = outcome.result
    return {
        "cqrs.outcome": outcome.status,
        "cqrs.error_code": reply.error.code if reply is not None and reply.error else None,
        "cqrs.version": reply.version if reply is not None else None,
    }


def _uuid_or_nil(value: str | None) -> UUID:
    try:
        return UUID(value or "")
    except ValueError:
        return NIL_UUID
