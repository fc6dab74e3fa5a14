"""`cqrs parked list|replay|drop`: the projector's parked events.

    cqrs parked list [--limit 100]          # JSON, oldest first; they stay parked
    cqrs parked replay                       # all, back to their partitions
    cqrs parked replay --id <message id> [--id ...]
    cqrs parked drop --id <message id>       # delete for good

Parked messages wait in `cqrs.projector.parked` with the reason in `x-cqrs-reason` and where they
came from in `x-cqrs-original-exchange` / `x-cqrs-original-routing-key`. A replay publishes a
message to the projector's partitioned exchange with its original routing key, body and headers
(minus the `x-` ones the parking and dead-lettering added), so it lands in its aggregate's
partition again; it is acked in the parked queue only after the broker confirmed that publish.
If it still cannot be applied it is parked again, with the new reason.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

import aio_pika
import typer
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity

from cqrs_cli.common import AmqpOption, amqp_url, run
from cqrs_runtime.messaging import copy_message
from shared.topology import (
    AGGREGATE_ID_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    PROJECTOR_PARKED_QUEUE,
    PROJECTOR_PARTITION_EXCHANGE,
    REASON_HEADER,
)

app = typer.Typer(
    no_args_is_help=True,
    help="The projector's parked events: list them, replay them, or drop them.",
)

T = TypeVar("T")

BODY_PREVIEW_CHARS = 300


@dataclass(frozen=True)
class ParkedEvent:
    """What an operator needs to decide about one parked message."""

    message_id: str | None
    type: str | None
    routing_key: str
    aggregate_id: str | None
    version: int | None
    position: int | None
    reason: str
    parked_at: datetime | None
    body: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "type": self.type,
            "routing_key": self.routing_key,
            "aggregate_id": self.aggregate_id,
            "version": self.version,
            "position": self.position,
            "reason": self.reason,
            "parked_at": None if self.parked_at is None else self.parked_at.isoformat(),
            "body": self.body,
        }


@dataclass(frozen=True)
class ParkedReplay:
    """What a replay or a drop did."""

    moved: int
    left: int


def describe(message: AbstractIncomingMessage) -> ParkedEvent:
    headers = dict(message.headers or {})
    return ParkedEvent(
        message_id=message.message_id,
        type=message.type,
        routing_key=_text(headers.get(ORIGINAL_ROUTING_KEY_HEADER)) or message.routing_key or "",
        aggregate_id=_text(headers.get(AGGREGATE_ID_HEADER)),
        version=_int(headers.get("version")),
        position=_int(headers.get("position")),
        reason=_text(headers.get(REASON_HEADER)) or "(dead-lettered by the broker)",
        parked_at=message.timestamp,
        body=message.body[:BODY_PREVIEW_CHARS].decode("utf-8", errors="replace"),
    )


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: object) -> int | None:
    try:
        return int(str(_text(value)))
    except ValueError:
        return None


async def _parked_queue(channel: AbstractChannel) -> AbstractQueue | None:
    """The parked queue as the projector declared it (bounds included), None before it has.

    Passive: a declaration with other arguments than the projector's would be refused.
    """
    try:
        return await channel.declare_queue(PROJECTOR_PARKED_QUEUE, passive=True)
    except ChannelNotFoundEntity:
        return None


async def _close(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        await channel.close()


async def parked_count(connection: AbstractConnection) -> int:
    channel = await connection.channel()
    try:
        queue = await _parked_queue(channel)
        return 0 if queue is None else int(queue.declaration_result.message_count or 0)
    finally:
        await _close(channel)


async def list_parked(connection: AbstractConnection, *, limit: int = 100) -> list[ParkedEvent]:
    """The first `limit` parked messages, oldest first; they stay parked.

    They are fetched unacknowledged and returned to the queue when the channel closes.
    """
    channel = await connection.channel()
    try:
        queue = await _parked_queue(channel)
        found: list[ParkedEvent] = []
        while queue is not None and len(found) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            found.append(describe(message))
        return found
    finally:
        await _close(channel)


async def replay_parked(
    connection: AbstractConnection, *, message_ids: Collection[str] | None = None
) -> ParkedReplay:
    """Send parked messages (all, or those with these message ids) back to their partitions.

    Only the messages parked when the call starts are looked at, so one that fails again and is
    parked anew is not replayed in a loop.
    """
    return await _move(connection, message_ids, replay=True)


async def drop_parked(
    connection: AbstractConnection, *, message_ids: Collection[str]
) -> ParkedReplay:
    """Delete these parked messages for good."""
    return await _move(connection, message_ids, replay=False)


async def _move(
    connection: AbstractConnection, message_ids: Collection[str] | None, *, replay: bool
) -> ParkedReplay:
    channel = await connection.channel(publisher_confirms=True)
    try:
        queue = await _parked_queue(channel)
        if queue is None:
            return ParkedReplay(moved=0, left=0)
        # Passive: the projector declared it with the parked queue, and this login may only
        # be allowed to use it, not to declare it.
        exchange = await channel.get_exchange(PROJECTOR_PARTITION_EXCHANGE, ensure=True)
        waiting = int(queue.declaration_result.message_count or 0)
        moved = left = 0
        for _ in range(waiting):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            if message_ids is not None and message.message_id not in message_ids:
                left += 1  # returned to the queue when the channel closes
                continue
            if replay:
                await exchange.publish(
                    _replayed(message), routing_key=describe(message).routing_key
                )
            await message.ack()
            moved += 1
        return ParkedReplay(moved=moved, left=left)
    finally:
        await _close(channel)


def _replayed(message: AbstractIncomingMessage) -> aio_pika.Message:
    headers = {
        key: value for key, value in (message.headers or {}).items() if not key.startswith("x-")
    }
    return copy_message(message, headers)


def to_json(events: list[ParkedEvent]) -> str:
    return json.dumps([event.as_dict() for event in events], indent=2)


def _with_connection(url: str, work: Callable[[AbstractConnection], Awaitable[T]]) -> T:
    async def connected() -> T:
        connection = await aio_pika.connect(url)
        try:
            return await work(connection)
        finally:
            await connection.close()

    # A broker that does not answer: a short error and exit code 2.
    return run(connected())


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="at most this many")] = 100,
    amqp: AmqpOption = None,
) -> None:
    """Print parked events as JSON: id, type, aggregate, version, position, reason, body."""
    parked = _with_connection(amqp_url(amqp), lambda c: list_parked(c, limit=limit))
    typer.echo(to_json(parked))


@app.command("replay")
def replay_command(
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="message id (event id); default: all")
    ] = None,
    amqp: AmqpOption = None,
) -> None:
    """Send parked events back to the projector."""
    wanted = set(ids) if ids else None
    result = _with_connection(amqp_url(amqp), lambda c: replay_parked(c, message_ids=wanted))
    typer.echo(json.dumps({"replayed": result.moved, "still_parked": result.left}))


@app.command("drop")
def drop_command(
    ids: Annotated[list[str], typer.Option("--id", help="message id (event id) to delete")],
    amqp: AmqpOption = None,
) -> None:
    """Delete parked events for good (after inspecting them with `list`)."""
    result = _with_connection(amqp_url(amqp), lambda c: drop_parked(c, message_ids=set(ids)))
    typer.echo(json.dumps({"dropped": result.moved, "still_parked": result.left}))
