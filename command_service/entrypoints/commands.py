"""The AMQP command consumer: one sequential loop per partition queue.

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

Each partition loop runs under the service's supervisor: if the loop itself fails (not one
message: those are contained above), it is logged, counted and restarted with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from uuid import UUID

import structlog
from aio_pika.abc import (
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from command_service.adapters.broker import dead_letter_message, reply_message
from command_service.adapters.subscription import BROKER_ERRORS
from command_service.metrics import CommandMetrics
from command_service.model.authorization import Actor
from command_service.service_layer.event_store import EventStoreUnavailableError
from command_service.service_layer.handlers import HandleCommand
from command_service.service_layer.registry import CommandRegistry, UnknownCommandError
from cqrs_runtime import tracing
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
        self._registry = registry
        self._replies = replies
        self._dead_letters = dead_letters
        self._max_message_bytes = max_message_bytes
        self._transient_retry_seconds = transient_retry_seconds
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._reply_prefixes = (*BROKER_REPLY_QUEUE_PREFIXES, reply_queue_prefix)
        self._partitions: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self.handled = 0

    def start_partition(self, name: str) -> None:
        """Consume one partition queue, one message at a time, under the supervisor."""
        stop = asyncio.Event()
        supervised = self._supervisor.spawn(name, lambda: self._consume(name, stop))
        self._partitions[name] = (stop, supervised.task)

    async def stop_partition(self, name: str, timeout: float = 10.0) -> None:
        """Stop consuming a partition after the message in hand is finished.

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
            while not stopped.done():
                receive = asyncio.ensure_future(anext(iterator))
                await asyncio.wait({receive, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await receive
                    return
                try:
                    message = receive.result()
                except StopAsyncIteration:
                    return  # the consumer was cancelled by the broker: consume again
                await self.process(message)
                mark_healthy()

    async def process(self, message: AbstractIncomingMessage) -> None:
        """Handle one delivery to its end: acked, dead-lettered or requeued."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            message_id=message.message_id, correlation_id=message.correlation_id
        )
        # Renamed `command <Type>` once the type is known to be one of ours.
        with tracing.span(
            "command", parent=tracing.extract(message.headers), kind="consumer"
        ) as span:
            await self._process(message, span)

    async def _process(self, message: AbstractIncomingMessage, span: tracing.SpanHandle) -> None:
        started = time.perf_counter()
        envelope: CommandEnvelope | None = None
        try:
            envelope = self._parse(message)
            _bind_envelope(envelope)
            actor = _sender(message, envelope)
            _describe_span(span, envelope)
            reply = await self._handle(envelope, actor)
        except BadCommandError as e:
            if e.envelope is not None:
                _bind_envelope(e.envelope)
            span.set("cqrs.outcome", "dead_lettered")
            span.set("cqrs.error_code", e.code)
            await self._dead_letter(message, e)
            self._metrics.settled(
                e.envelope.type if e.envelope else None,
                "dead_lettered",
                time.perf_counter() - started,
            )
            return
        except EventStoreUnavailableError as e:
            span.set("cqrs.outcome", "requeued")
            log.error("command_requeued", error=str(e))
            self._metrics.settled(
                envelope.type if envelope else None, "requeued", time.perf_counter() - started
            )
            # Not a nack of this one message: the next ones are delivered here already and would
            # be handled before it came back. Closing the channel returns it and all of them to
            # the queue, in their order.
            raise PartitionPausedError(str(e)) from e
        except Exception as e:  # one message must not stop the partition
            log.error("command_failed", exc_info=e)
            span.set("cqrs.outcome", "failed")
            span.set("cqrs.error_code", "internal_error")
            failure = BadCommandError(
                "internal_error", f"{type(e).__name__}: {e}", envelope, reply=INTERNAL_ERROR_REPLY
            )
            await self._dead_letter(message, failure)
            self._metrics.settled(
                envelope.type if envelope else None, "failed", time.perf_counter() - started
            )
            return
        span.set("cqrs.outcome", reply.status)
        span.set("cqrs.error_code", reply.error.code if reply.error else None)
        span.set("cqrs.version", reply.version)
        log.debug(
            "command_handled",
            status=reply.status,
            version=reply.version,
            position=reply.position,
            error_code=reply.error.code if reply.error else None,
        )
        await self._reply(message, reply)
        await message.ack()
        self.handled += 1
        self._metrics.settled(envelope.type, reply.status, time.perf_counter() - started)

    def _parse(self, message: AbstractIncomingMessage) -> CommandEnvelope:
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
            envelope = CommandEnvelope.model_validate_json(message.body)
        except ValidationError as e:
            in_payload = all(error["loc"][:1] == ("payload",) for error in e.errors())
            code = "invalid_payload" if in_payload else "invalid_envelope"
            raise BadCommandError(code, _describe(e)) from e
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
            self._registry.parse(envelope)
        except UnknownCommandError as e:
            raise BadCommandError("unknown_command_type", str(e), envelope) from e
        except ValidationError as e:
            raise BadCommandError("invalid_payload", _describe(e), envelope) from e
        return envelope

    async def _handle(self, envelope: CommandEnvelope, actor: Actor) -> Reply:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(EventStoreUnavailableError),
            wait=wait_exponential(multiplier=0.1, max=5),
            stop=stop_after_delay(self._transient_retry_seconds),
            before_sleep=lambda state: log.warning(
                "event_store_unavailable", attempt=state.attempt_number
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._handle_command(envelope, actor=actor)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _dead_letter(self, message: AbstractIncomingMessage, error: BadCommandError) -> None:
        reason = f"{error.code}: {error.message}"
        log.warning("command_dead_lettered", reason=reason)
        await self._dead_letters.publish(
            dead_letter_message(message, reason, max_body_bytes=self._max_message_bytes),
            routing_key="",
        )
        command_id = (
            error.envelope.command_id if error.envelope else _uuid_or_nil(message.message_id)
        )
        reply = Reply(
            command_id=command_id,
            status="rejected",
            aggregate_id=error.envelope.aggregate_id if error.envelope else None,
            error=ReplyError(code=error.code, message=error.reply),
        )
        await self._reply(message, reply)
        await message.ack()

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


def _bind_envelope(envelope: CommandEnvelope) -> None:
    metadata = envelope.metadata
    structlog.contextvars.bind_contextvars(
        command_id=str(envelope.command_id),
        command_type=envelope.type,
        aggregate_id=str(envelope.aggregate_id),
        causation_id=metadata.causation_id,
    )
    if metadata.correlation_id is not None:  # else the message's own stays bound
        structlog.contextvars.bind_contextvars(correlation_id=metadata.correlation_id)


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
    structlog.contextvars.bind_contextvars(user=user_id)
    return Actor.user(user_id)


def _describe_span(span: tracing.SpanHandle, envelope: CommandEnvelope) -> None:
    span.rename(f"command {envelope.type}")
    span.set("cqrs.command_id", str(envelope.command_id))
    span.set("cqrs.command_type", envelope.type)
    span.set("cqrs.aggregate_id", str(envelope.aggregate_id))
    span.set("cqrs.correlation_id", envelope.metadata.correlation_id)


def _uuid_or_nil(value: str | None) -> UUID:
    try:
        return UUID(value or "")
    except ValueError:
        return NIL_UUID
