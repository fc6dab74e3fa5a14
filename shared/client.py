"""A small client that publishes commands and awaits their replies.

Every error it raises is a `CommandClientError`; no exception of the AMQP driver reaches the
caller. A publish that meets a lost connection waits, within the call's timeout, for the robust
connection to come back and publishes then; a command whose reply may have been lost with the
connection is published again (the same command id, so it is handled once and answered with its
stored outcome).

Every command carries the AMQP `user_id` property set to the client's login, which the broker
checks against the connection (a mismatch is refused: `BrokerRefusedError`); the command
service knows the sender by it and authorizes the command for that login.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit
from uuid import UUID, uuid4

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    FieldValue,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from aiormq.exceptions import ChannelAccessRefused

from shared.amqp import broker_login, tolerate_invalid_utf8
from shared.messages import Command, CommandEnvelope, CommandMetadata, Reply
from shared.topology import (
    AGGREGATE_ID_HEADER,
    COMMANDS_EXCHANGE,
    REPLY_QUEUE_PREFIX,
    routing_key,
)

# How long the robust connection waits between reconnection attempts (aio-pika's default is 5 s,
# half of a call's default timeout); `reconnect_interval` in the URL's query overrides it.
RECONNECT_INTERVAL_SECONDS = 1.0
# Pause between publish attempts while the connection is being restored, so a channel that is
# not usable yet is not hammered.
RETRY_PAUSE_SECONDS = 0.1


class CommandClientError(Exception):
    """The root of every error `CommandClient` raises: catch this one to catch them all."""


class BrokerUnavailableError(CommandClientError, ConnectionError):
    """The broker could not be reached, or did not come back, within the call's timeout.

    When it is raised by a send or publish, the command may or may not have reached the broker:
    send it again with the same command id, which the command service handles only once.
    """


class CommandServiceUnavailableError(CommandClientError, ConnectionError):
    """No command service has declared its topology: no commands exchange, or no queue on it."""


class BrokerRefusedError(CommandClientError):
    """The broker refused the command for good: no permission to publish, larger than its
    `max_message_size`, or negatively confirmed. Sending it again would be refused again."""


class CommandTimeoutError(CommandClientError, TimeoutError):
    """No reply arrived within the timeout; the command may still be handled later."""


def envelope_for(
    command: Command,
    aggregate_id: UUID,
    *,
    expected_version: int | None = None,
    correlation_id: str | None = None,
    command_id: UUID | None = None,
) -> CommandEnvelope:
    """Wrap a typed command payload in an envelope."""
    fields: dict[str, object] = {
        "type": command.type_name(),
        "aggregate_id": aggregate_id,
        "expected_version": expected_version,
        "payload": command.model_dump(mode="json"),
        "metadata": CommandMetadata(correlation_id=correlation_id),
    }
    if command_id is not None:
        fields["command_id"] = command_id
    return CommandEnvelope.model_validate(fields)


class CommandClient:
    """Publishes command envelopes to `cqrs.commands` and matches replies by correlation id.

    Replies arrive on an exclusive queue owned by this client (redeclared by the robust
    connection after a reconnection). Every call is bounded by its `timeout`, reconnections
    included, and raises only `CommandClientError`s. Commands are published with `user_id`, the
    login they are sent as.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        exchange: AbstractExchange,
        reply_queue: AbstractQueue,
        user_id: str | None = None,
    ) -> None:
        self.user_id = user_id
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._reply_queue = reply_queue
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        # Set, and replaced by a fresh one, each time the connection has been restored.
        self._reconnected = asyncio.Event()
        # Why the last publish had to wait for the connection, for the error if it never came.
        self._last_error: BaseException | None = None

    @classmethod
    async def connect(
        cls, amqp_url: str, *, timeout: float = 10.0, user_id: str | None = None
    ) -> Self:
        """Connect, find the commands exchange and open a reply queue.

        Commands carry `user_id`, by default the URL's login (percent-decoded; `guest` when it
        names none). With `auth=external` the login comes from the client certificate, which
        the URL does not name: pass it as `user_id`, or commands go without one (anonymous).
        Raises `BrokerUnavailableError` when the broker does not answer within `timeout`,
        `CommandServiceUnavailableError` when no command service has declared its exchange.
        """
        if user_id is None:
            user_id = broker_login(amqp_url)
        tolerate_invalid_utf8()
        options: dict[str, Any] = {}
        if "reconnect_interval" not in parse_qs(urlsplit(amqp_url).query):
            options["reconnect_interval"] = RECONNECT_INTERVAL_SECONDS
        try:
            # The driver's own timeout, not a cancellation from outside: a cancelled first
            # attempt would leave the connection retrying in the background for ever.
            connection = await aio_pika.connect_robust(amqp_url, timeout=timeout, **options)
        except CONNECTION_EXCEPTIONS as e:
            raise BrokerUnavailableError(f"broker unavailable: {_describe(e)}") from e
        try:
            async with asyncio.timeout(timeout):
                return await cls._open(connection, user_id)
        except BaseException as e:
            await connection.close()
            if isinstance(e, CommandClientError):
                raise
            if isinstance(e, ChannelNotFoundEntity):
                raise CommandServiceUnavailableError(
                    f"exchange {COMMANDS_EXCHANGE} does not exist: has a command service started?"
                ) from e
            if isinstance(e, ChannelAccessRefused):
                raise BrokerRefusedError(f"the broker refused: {_describe(e)}") from e
            if isinstance(e, (TimeoutError, *CONNECTION_EXCEPTIONS)):
                raise BrokerUnavailableError(f"broker unavailable: {_describe(e)}") from e
            raise

    @classmethod
    async def _open(cls, connection: AbstractRobustConnection, user_id: str | None) -> Self:
        # on_return_raises: a command no queue takes is an error, not a reply that never comes.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Passive: a client needs no right to create or change the command service's topology.
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=True)
        reply_queue = await channel.declare_queue(
            f"{REPLY_QUEUE_PREFIX}{uuid4().hex}", exclusive=True, auto_delete=True
        )
        client = cls(connection, channel, exchange, reply_queue, user_id)
        await reply_queue.consume(client._on_reply, no_ack=True)
        connection.reconnect_callbacks.add(client._on_reconnect)
        return client

    @property
    def is_connected(self) -> bool:
        """Whether the connection and the client's channel are open right now."""
        return self._connection.connected.is_set() and not self._channel.is_closed

    def _on_reconnect(self, _connection: object) -> None:
        reconnected, self._reconnected = self._reconnected, asyncio.Event()
        self._last_error = None
        reconnected.set()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(Reply.model_validate_json(message.body))

    async def publish(
        self,
        envelope: CommandEnvelope,
        aggregate_type: str,
        *,
        reply: bool,
        timeout: float = 10.0,
    ) -> None:
        """Publish one command (persistent, confirmed by the broker) within `timeout`."""
        await self.publish_body(
            envelope.model_dump_json().encode(),
            command_id=str(envelope.command_id),
            command_type=envelope.type,
            aggregate_id=str(envelope.aggregate_id),
            routing_key=routing_key(aggregate_type, envelope.type),
            correlation_id=envelope.metadata.correlation_id,
            reply=reply,
            timeout=timeout,
        )

    async def publish_command(
        self,
        command: Command,
        aggregate_id: UUID,
        *,
        expected_version: int | None = None,
        timeout: float = 10.0,
    ) -> UUID:
        """Publish a typed command without waiting for its reply; returns its command id."""
        envelope = envelope_for(command, aggregate_id, expected_version=expected_version)
        await self.publish(envelope, command.aggregate_type, reply=False, timeout=timeout)
        return envelope.command_id

    async def publish_body(
        self,
        body: bytes,
        *,
        command_id: str,
        command_type: str,
        aggregate_id: str,
        routing_key: str,
        correlation_id: str | None = None,
        reply: bool,
        timeout: float = 10.0,
    ) -> None:
        """Publish a ready-made body (it need not be a valid envelope: load tools send bad ones)."""
        message = self._message(
            body,
            command_id=command_id,
            command_type=command_type,
            aggregate_id=aggregate_id,
            correlation_id=correlation_id,
            reply=reply,
        )
        try:
            async with asyncio.timeout(timeout):
                await self._publish(message, routing_key)
        except TimeoutError as e:
            raise self._not_published(command_id, timeout) from e

    def _message(
        self,
        body: bytes,
        *,
        command_id: str,
        command_type: str,
        aggregate_id: str,
        correlation_id: str | None,
        reply: bool,
    ) -> aio_pika.Message:
        headers: dict[str, FieldValue] = {AGGREGATE_ID_HEADER: aggregate_id}
        _inject_trace_context(headers)  # the caller's trace continues in the command service
        return aio_pika.Message(
            body=body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=command_id,
            correlation_id=correlation_id or command_id,
            reply_to=self._reply_queue.name if reply else None,
            type=command_type,
            user_id=self.user_id,
            headers=headers,
        )

    async def _publish(self, message: aio_pika.Message, routing_key: str) -> None:
        """Publish and await the broker's confirm, across reconnections; no timeout of its own.

        A lost connection or channel is waited out: the robust connection restores the channel
        and the message is published again. A lost confirm may mean the broker has the first
        copy; the command id makes the second one a duplicate the command service answers
        without handling it twice.
        """
        pause = RETRY_PAUSE_SECONDS
        while True:
            try:
                await self._exchange.publish(message, routing_key=routing_key, mandatory=True)
                return
            except PublishError as e:  # returned: no queue is bound for this routing key
                raise CommandServiceUnavailableError(
                    f"no queue took the command (routing key {routing_key!r}): has a command "
                    "service declared its partitions?"
                ) from e
            except DeliveryError as e:  # negatively confirmed
                raise BrokerRefusedError(f"the broker refused the command: {_describe(e)}") from e
            except ChannelNotFoundEntity as e:
                raise CommandServiceUnavailableError(
                    f"exchange {COMMANDS_EXCHANGE} does not exist: has a command service started?"
                ) from e
            except (ChannelAccessRefused, ChannelPreconditionFailed) as e:
                # Refused for what the message is or who sends it (no right to publish, a
                # `user_id` that is not the login): the same again fails again.
                raise BrokerRefusedError(f"the broker refused the command: {_describe(e)}") from e
            except CONNECTION_EXCEPTIONS as e:
                self._last_error = e
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_INTERVAL_SECONDS)
            await self._channel.ready()

    def _not_published(self, command_id: str, timeout: float) -> BrokerUnavailableError:
        last = self._last_error
        detail = f" (last error: {_describe(last)})" if last is not None else ""
        return BrokerUnavailableError(
            f"broker unavailable: command {command_id} not published within {timeout}s{detail}"
        )

    async def send(
        self, envelope: CommandEnvelope, aggregate_type: str, *, timeout: float = 10.0
    ) -> Reply:
        """Publish a command and wait for its reply."""
        correlation_id = envelope.metadata.correlation_id or str(envelope.command_id)
        command_id = str(envelope.command_id)
        message = self._message(
            envelope.model_dump_json().encode(),
            command_id=command_id,
            command_type=envelope.type,
            aggregate_id=str(envelope.aggregate_id),
            correlation_id=envelope.metadata.correlation_id,
            reply=True,
        )
        return await self._await_reply(
            correlation_id,
            command_id,
            message,
            routing_key(aggregate_type, envelope.type),
            timeout=timeout,
        )

    async def send_body(
        self,
        body: bytes,
        *,
        command_id: str,
        command_type: str,
        aggregate_id: str,
        routing_key: str,
        timeout: float = 10.0,
    ) -> Reply:
        """Publish a ready-made body with `command_id` as its correlation id; await the reply."""
        message = self._message(
            body,
            command_id=command_id,
            command_type=command_type,
            aggregate_id=aggregate_id,
            correlation_id=None,
            reply=True,
        )
        return await self._await_reply(
            command_id, command_id, message, routing_key, timeout=timeout
        )

    async def _await_reply(
        self,
        correlation_id: str,
        command_id: str,
        message: aio_pika.Message,
        routing_key: str,
        *,
        timeout: float,
    ) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        published = False
        try:
            # The publish counts too: a broker that blocks publishers must not hang the caller.
            async with asyncio.timeout(timeout):
                while True:
                    reconnected = self._reconnected
                    await self._publish(message, routing_key)
                    published = True
                    waiter: asyncio.Future[Any] = asyncio.ensure_future(reconnected.wait())
                    either: set[asyncio.Future[Any]] = {future, waiter}
                    try:
                        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if future.done():
                        return future.result()
                    # The reply queue was gone while the connection was down: a reply sent
                    # then is lost. Ask again; a command already handled is answered with its
                    # stored outcome (status `duplicate`).
        except TimeoutError as e:
            if not published:
                raise self._not_published(command_id, timeout) from e
            if not self.is_connected:
                raise BrokerUnavailableError(
                    f"broker unavailable: no reply to command {command_id} within {timeout}s, "
                    "and the connection is down"
                ) from e
            raise CommandTimeoutError(f"no reply to command {command_id} within {timeout}s") from e
        finally:
            self._pending.pop(correlation_id, None)

    async def send_command(
        self,
        command: Command,
        aggregate_id: UUID,
        *,
        expected_version: int | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        """Build the envelope for a typed command, send it and wait for the reply."""
        envelope = envelope_for(command, aggregate_id, expected_version=expected_version)
        return await self.send(envelope, command.aggregate_type, timeout=timeout)

    async def close(self) -> None:
        await self._connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _describe(error: BaseException) -> str:
    """A driver error as one line for a message: its text, or its type when it has none."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _inject_trace_context(headers: dict[str, FieldValue]) -> None:
    """Add the caller's trace context (`traceparent`, ...) as the caller's OpenTelemetry set-up
    propagates it (its global propagator, `OTEL_PROPAGATORS`); nothing without OpenTelemetry."""
    inject = _opentelemetry_inject()
    if inject is not None:
        inject(headers)


@functools.cache
def _opentelemetry_inject() -> Callable[[dict[str, FieldValue]], None] | None:
    # Looked up once, on the first command: the SDK runs without OpenTelemetry installed.
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        return None
    return inject
