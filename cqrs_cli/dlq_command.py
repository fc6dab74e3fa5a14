"""`cqrs dlq list|replay`: the command service's dead letters, `cqrs.commands.dead`.

`list` fetches messages unacknowledged and lets them return to the queue when its channel
closes, in their order, so looking loses nothing (also when the tool is interrupted). `replay`
publishes each chosen message to `cqrs.commands` again, with its original routing key and
headers minus those dead-lettering added, and acks it in the dead-letter queue only after the
broker confirmed that publish. A replayed command that is still bad is dead-lettered again.

A replayed command is published under the replaying login (its AMQP `user_id`), so the command
service authorizes it for that login, not for its first sender: `list` shows who that was
(`sender`, absent for a command sent without `user_id`).

A dead letter whose body was cut (a command over the size limit: the copy keeps a prefix, the
original size and SHA-256 in its headers) is listed as truncated and never replayed: what is
left of it is not the command that was sent.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import aio_pika
import typer
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from rich.table import Table
from rich.text import Text

from cqrs_cli.common import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    AmqpOption,
    JsonOption,
    amqp_url,
    fail,
    out,
    print_json,
    run,
)
from cqrs_runtime.messaging import copy_message
from shared import topology
from shared.amqp import broker_login, truncation

app = typer.Typer(help="Dead-lettered commands: look at them, replay them.", no_args_is_help=True)

ORIGINAL_ROUTING_KEY_HEADER = "x-original-routing-key"
BODY_PREVIEW_CHARS = 300


class NoDeadLetterQueueError(LookupError):
    """The dead-letter queue does not exist (no command service has declared it yet)."""


@dataclass(frozen=True)
class DeadLetter:
    """What an operator needs to decide about one dead-lettered command."""

    command_id: str | None
    type: str | None
    routing_key: str | None
    aggregate_id: str | None
    reason: str
    issued_at: str | None
    age_seconds: float | None
    body: str
    # Set when the copy's body is only a prefix of the command's: its original size and SHA-256.
    original_size: int | None = None
    original_sha256: str | None = None
    # Who sent it (the broker-verified login, recorded by the command service); None: nobody.
    sender: str | None = None

    @property
    def truncated(self) -> bool:
        return self.original_size is not None


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _original_routing_key(message: AbstractIncomingMessage) -> str | None:
    headers = message.headers or {}
    key = _text(headers.get(ORIGINAL_ROUTING_KEY_HEADER))
    if key:
        return key
    # Dead-lettered by the broker itself (a rejected delivery): x-death names the key.
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        keys = deaths[0].get("routing-keys")
        if isinstance(keys, list) and keys:
            return _text(keys[0])
    return None


def describe(message: AbstractIncomingMessage, now: datetime) -> DeadLetter:
    headers = message.headers or {}
    body: dict[str, Any] = {}
    try:
        parsed = json.loads(message.body)
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    cut = truncation(message.headers)
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    issued = _instant(metadata.get("issued_at") if metadata else None) or message.timestamp
    if issued is not None and issued.tzinfo is None:
        issued = issued.replace(tzinfo=UTC)
    return DeadLetter(
        command_id=message.message_id or _text(body.get("command_id")),
        type=message.type or _text(body.get("type")),
        routing_key=_original_routing_key(message),
        aggregate_id=_text(headers.get(topology.AGGREGATE_ID_HEADER))
        or _text(body.get("aggregate_id")),
        reason=_text(headers.get(topology.REASON_HEADER)) or "(dead-lettered by the broker)",
        issued_at=None if issued is None else issued.isoformat(),
        age_seconds=None if issued is None else round((now - issued).total_seconds(), 1),
        body=message.body[:BODY_PREVIEW_CHARS].decode("utf-8", errors="replace"),
        original_size=None if cut is None else cut[0],
        original_sha256=None if cut is None else cut[1],
        sender=_text(headers.get(topology.SENDER_HEADER)),
    )


def _instant(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


async def _dead_letter_queue(channel: AbstractChannel) -> AbstractQueue:
    try:
        return await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity as e:
        raise NoDeadLetterQueueError(
            f"queue {topology.COMMAND_DEAD_LETTER_QUEUE} does not exist: "
            "has a command service started?"
        ) from e


async def list_dead_letters(url: str, *, limit: int) -> tuple[int, list[DeadLetter]]:
    """How many wait, and the first `limit` of them, oldest first; all stay where they are."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await _dead_letter_queue(channel)
        waiting = int(queue.declaration_result.message_count or 0)
        now = datetime.now(UTC)
        found: list[DeadLetter] = []
        # Held unacknowledged: closing the channel puts every one back in its place.
        while len(found) < min(limit, waiting):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            found.append(describe(message, now))
        await channel.close()
        return waiting, found
    finally:
        await connection.close()


@dataclass
class ReplayResult:
    replayed: list[str | None]
    left: int
    not_found: list[str]
    skipped: list[dict[str, str | None]]


def replayed_message(message: AbstractIncomingMessage, user_id: str | None) -> aio_pika.Message:
    """The original command: body and properties as sent, without the dead-lettering headers,
    sent by `user_id` (the replaying login)."""
    headers = {
        key: value
        for key, value in (message.headers or {}).items()
        if key not in (topology.REASON_HEADER, topology.SENDER_HEADER, ORIGINAL_ROUTING_KEY_HEADER)
        and not key.startswith(("x-death", "x-first-death", "x-last-death"))
    }
    return copy_message(message, headers, user_id=user_id)


async def replay_dead_letters(url: str, *, command_ids: Collection[str] | None) -> ReplayResult:
    """Republish dead letters (all, or those with these command ids) to `cqrs.commands`.

    Only the messages waiting when the call starts are looked at, so one that is dead-lettered
    again is not replayed in a loop. Each is acked only after its publish was confirmed; on any
    failure the rest return to the queue when the channel closes.
    """
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await _dead_letter_queue(channel)
        commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=True)
        waiting = int(queue.declaration_result.message_count or 0)
        result = ReplayResult(replayed=[], left=0, not_found=[], skipped=[])
        seen: set[str] = set()
        for _ in range(waiting):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            if command_ids is not None and message.message_id not in command_ids:
                result.left += 1  # back to the queue, in its place, when the channel closes
                continue
            cut = truncation(message.headers)
            if cut is not None:
                result.left += 1
                result.skipped.append(
                    {
                        "command_id": message.message_id,
                        "why": f"truncated: the dead letter keeps {len(message.body):,} of the "
                        f"command's {cut[0]:,} bytes (sha256 {cut[1]}), so it cannot be "
                        "replayed; the sender must send the command again",
                    }
                )
                continue
            routing_key = _original_routing_key(message)
            if not routing_key:
                result.left += 1
                result.skipped.append(
                    {"command_id": message.message_id, "why": "no original routing key"}
                )
                continue
            # mandatory: a command no queue takes is returned and raises, and stays here.
            await commands.publish(
                replayed_message(message, broker_login(url)), routing_key, mandatory=True
            )
            await message.ack()
            result.replayed.append(message.message_id)
            if message.message_id:
                seen.add(message.message_id)
        await channel.close()
        result.not_found = sorted(set(command_ids or ()) - seen)
        return result
    finally:
        await connection.close()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _broker_call(work: Any) -> Any:
    try:
        return run(work)
    except NoDeadLetterQueueError as e:
        fail(str(e), EXIT_UNREACHABLE)
    except aio_pika.exceptions.DeliveryError as e:
        # Nothing acked for it: the message is still dead-lettered.
        fail(f"the broker did not take a replayed command ({e!r}); it stays dead-lettered")


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="at most this many")] = 100,
    as_json: JsonOption = False,
    amqp: AmqpOption = None,
) -> None:
    """Show dead-lettered commands, oldest first: reason, type, command id, age. They stay."""
    waiting, letters = _broker_call(list_dead_letters(amqp_url(amqp), limit=limit))
    if as_json:
        print_json(
            {
                "waiting": waiting,
                "messages": [
                    {**asdict(letter), "truncated": letter.truncated} for letter in letters
                ],
            }
        )
        return
    table = Table(title=f"{topology.COMMAND_DEAD_LETTER_QUEUE}: {waiting} dead-lettered")
    for column in ("#", "command id", "type", "routing key", "sender", "age", "reason", "body"):
        table.add_column(column, overflow="fold")
    for index, letter in enumerate(letters, 1):
        table.add_row(
            str(index),
            letter.command_id or "-",
            Text(letter.type or "-"),
            Text(letter.routing_key or "-"),
            Text(letter.sender or "-"),
            _age(letter.age_seconds),
            Text(letter.reason, style="red"),
            Text(f"truncated (of {letter.original_size:,} bytes)", style="yellow")
            if letter.original_size is not None
            else Text("whole"),
        )
    out().print(table)
    if waiting > len(letters):
        out().print(Text(f"{waiting - len(letters)} more; --limit to see them", style="dim"))


@app.command("replay")
def replay_command(
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="command id (message id) to replay")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="replay every dead letter")] = False,
    as_json: JsonOption = False,
    amqp: AmqpOption = None,
) -> None:
    """Send dead-lettered commands to `cqrs.commands` again (after fixing what was wrong).

    Exit 1 when an --id was not found or a message could not be replayed.
    """
    if bool(ids) == replay_all:
        raise typer.BadParameter("pass --id (one or more) or --all")
    wanted = set(ids) if ids else None
    result: ReplayResult = _broker_call(replay_dead_letters(amqp_url(amqp), command_ids=wanted))
    if as_json:
        print_json(asdict(result))
    else:
        out().print(
            Text(
                f"replayed {len(result.replayed)}, left in the dead-letter queue {result.left}",
                style="green" if result.replayed else "",
            )
        )
        for command_id in result.replayed:
            out().print(Text(f"  replayed {command_id or '(no command id)'}"))
        for skipped in result.skipped:
            out().print(Text(f"  skipped {skipped['command_id']}: {skipped['why']}", style="red"))
        for missing in result.not_found:
            out().print(Text(f"  not found: {missing}", style="red"))
    if result.not_found or result.skipped:
        raise typer.Exit(EXIT_ERROR)
