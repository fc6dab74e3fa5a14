"""A small client that publishes commands and awaits their replies."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Self
from uuid import UUID, uuid4

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    FieldValue,
)

from shared import tracing
from shared.messages import Command, CommandEnvelope, CommandMetadata, Reply
from shared.topology import (
    AGGREGATE_ID_HEADER,
    COMMANDS_EXCHANGE,
    REPLY_QUEUE_PREFIX,
    routing_key,
)


class CommandServiceUnavailableError(ConnectionError):
    """The broker has no commands exchange: no command service has declared its topology yet."""


class CommandTimeoutError(TimeoutError):
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

    Replies arrive on an exclusive, server-named queue owned by this client.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        reply_queue: AbstractQueue,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._reply_queue = reply_queue
        self._pending: dict[str, asyncio.Future[Reply]] = {}

    @classmethod
    async def connect(cls, amqp_url: str) -> Self:
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel(publisher_confirms=True)
        try:
            # Passive: a client needs no right to create or change the command service's topology.
            exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as e:
            await connection.close()
            raise CommandServiceUnavailableError(
                f"exchange {COMMANDS_EXCHANGE} does not exist: has a command service started?"
            ) from e
        reply_queue = await channel.declare_queue(
            f"{REPLY_QUEUE_PREFIX}{uuid4().hex}", exclusive=True, auto_delete=True
        )
        client = cls(connection, channel, exchange, reply_queue)
        await reply_queue.consume(client._on_reply, no_ack=True)
        return client

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(Reply.model_validate_json(message.body))

    async def publish(self, envelope: CommandEnvelope, aggregate_type: str, *, reply: bool) -> None:
        """Publish one command (persistent, confirmed by the broker)."""
        await self.publish_body(
            envelope.model_dump_json().encode(),
            command_id=str(envelope.command_id),
            command_type=envelope.type,
            aggregate_id=str(envelope.aggregate_id),
            routing_key=routing_key(aggregate_type, envelope.type),
            correlation_id=envelope.metadata.correlation_id,
            reply=reply,
        )

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
    ) -> None:
        """Publish a ready-made body (it need not be a valid envelope: load tools send bad ones)."""
        headers: dict[str, FieldValue] = {AGGREGATE_ID_HEADER: aggregate_id}
        tracing.inject(headers)  # the caller's trace continues in the command service
        await self._exchange.publish(
            aio_pika.Message(
                body=body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=command_id,
                correlation_id=correlation_id or command_id,
                reply_to=self._reply_queue.name if reply else None,
                type=command_type,
                headers=headers,
            ),
            routing_key=routing_key,
            mandatory=True,
        )

    async def send(
        self, envelope: CommandEnvelope, aggregate_type: str, *, timeout: float = 10.0
    ) -> Reply:
        """Publish a command and wait for its reply."""
        correlation_id = envelope.metadata.correlation_id or str(envelope.command_id)
        return await self._await_reply(
            correlation_id,
            str(envelope.command_id),
            self.publish(envelope, aggregate_type, reply=True),
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
        return await self._await_reply(
            command_id,
            command_id,
            self.publish_body(
                body,
                command_id=command_id,
                command_type=command_type,
                aggregate_id=aggregate_id,
                routing_key=routing_key,
                reply=True,
            ),
            timeout=timeout,
        )

    async def _await_reply(
        self, correlation_id: str, command_id: str, publish: Awaitable[None], *, timeout: float
    ) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            # The publish counts too: a broker that blocks publishers must not hang the caller.
            async with asyncio.timeout(timeout):
                await publish
                return await future
        except TimeoutError as e:
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
