"""The command service in-process against real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from command_service.bootstrap import CommandService
from shared import topology
from shared.amqp import TRUNCATED_BODY_BYTES
from shared.client import CommandClient, envelope_for
from shared.ledger import DepositMoney, OpenAccount, WithdrawMoney
from shared.messages import CommandEnvelope, EventEnvelope, Reply

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(broker)
    yield await connection.channel()
    await connection.close()


@pytest.fixture
async def events_queue(
    channel: aio_pika.abc.AbstractChannel, command_service: CommandService
) -> AbstractQueue:
    """A queue that sees every event the service publishes."""
    exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    return queue


async def drain(
    queue: AbstractQueue, count: int, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    received: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout):
        while len(received) < count:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            await message.ack()
            received.append(message)
    return received


async def drain_through(
    queue: AbstractQueue, last_cause: uuid.UUID, timeout: float = 10.0
) -> list[EventEnvelope]:
    """Every event up to and including the first one caused by command `last_cause`.

    The relay publishes in position order on one channel, so once a later command's event has
    arrived, every event stored before it has arrived too: what came before is all there is.
    """
    received: list[EventEnvelope] = []
    while not received or received[-1].metadata.causation_id != str(last_cause):
        [message] = await drain(queue, 1, timeout)
        received.append(EventEnvelope.model_validate_json(message.body))
    return received


async def test_accepted_commands_are_replied_and_their_events_published_in_order(
    client: CommandClient, events_queue: AbstractQueue
) -> None:
    account = uuid.uuid4()
    opened = await client.send_command(
        OpenAccount(owner_id="alice", currency="EUR", initial_deposit=100), account
    )
    deposited = await client.send_command(DepositMoney(amount=50), account)
    assert (opened.status, opened.version) == ("accepted", 2)
    assert (deposited.status, deposited.version) == ("accepted", 3)
    assert deposited.position is not None and opened.position is not None
    assert deposited.position > opened.position

    messages = await drain(events_queue, 3)
    envelopes = [EventEnvelope.model_validate_json(m.body) for m in messages]
    assert [(e.type, e.version) for e in envelopes] == [
        ("AccountOpened", 1),
        ("MoneyDeposited", 2),
        ("MoneyDeposited", 3),
    ]
    assert [m.routing_key for m in messages] == [
        "account.AccountOpened",
        "account.MoneyDeposited",
        "account.MoneyDeposited",
    ]
    assert all(m.message_id == str(e.event_id) for m, e in zip(messages, envelopes, strict=True))
    assert all(m.headers["aggregate_id"] == str(account) for m in messages)
    assert envelopes[2].metadata.causation_id == str(deposited.command_id)


async def test_domain_rule_violation_is_a_rejection_not_a_dead_letter(
    client: CommandClient, channel: aio_pika.abc.AbstractChannel, command_service: CommandService
) -> None:
    account = uuid.uuid4()
    await client.send_command(OpenAccount(owner_id="bob", currency="EUR"), account)
    reply = await client.send_command(WithdrawMoney(amount=1), account)
    assert reply.status == "rejected"
    assert reply.error is not None and reply.error.code == "insufficient_funds"
    dead = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
    assert dead.declaration_result.message_count == 0


async def test_resent_command_answers_duplicate_and_publishes_nothing_new(
    client: CommandClient, events_queue: AbstractQueue
) -> None:
    account = uuid.uuid4()
    envelope = envelope_for(OpenAccount(owner_id="carol", currency="EUR"), account)
    first = await client.send(envelope, "account")
    again = await client.send(envelope, "account")
    assert first.status == "accepted"
    assert again.status == "duplicate"
    assert (again.version, again.position) == (first.version, first.position)
    # Sent after the duplicate was answered: its event comes after anything the duplicate stored.
    later = await client.send_command(DepositMoney(amount=1), account)
    assert (later.status, later.version) == ("accepted", 2)
    published = await drain_through(events_queue, later.command_id)
    assert [(e.type, e.version) for e in published] == [("AccountOpened", 1), ("MoneyDeposited", 2)]


BAD_MESSAGES = {
    "malformed_json": (b'{"type": "OpenAccount", ', "application/json", "invalid_envelope"),
    "unknown_type": (
        json.dumps({"type": "Teleport", "aggregate_id": str(uuid.uuid4())}).encode(),
        "application/json",
        "unknown_command_type",
    ),
    "schema_violation": (
        json.dumps(
            {"type": "DepositMoney", "aggregate_id": str(uuid.uuid4()), "payload": {"amount": -3}}
        ).encode(),
        "application/json",
        "invalid_payload",
    ),
    "oversized": (b'{"pad": "' + b"x" * 5000 + b'"}', "application/json", "message_too_large"),
    "wrong_content_type": (b"<command/>", "application/xml", "unsupported_content_type"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
async def test_bad_input_is_dead_lettered_with_reason_and_rejected(
    case: str,
    client: CommandClient,
    channel: aio_pika.abc.AbstractChannel,
    command_service: CommandService,
) -> None:
    body, content_type, code = BAD_MESSAGES[case]
    replies = await channel.declare_queue(exclusive=True)
    commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
    await commands.publish(
        aio_pika.Message(
            body,
            content_type=content_type,
            correlation_id="bad-1",
            reply_to=replies.name,
            message_id=str(uuid.uuid4()),
        ),
        routing_key="account.Whatever",
    )
    [reply_message] = await drain(replies, 1)
    reply = Reply.model_validate_json(reply_message.body)
    assert reply_message.correlation_id == "bad-1"
    assert reply.status == "rejected"
    assert reply.error is not None and reply.error.code == code

    dead = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
    [dead_letter] = await drain(dead, 1)
    # An oversized command's copy keeps a prefix (test_dead_letter_copies.py).
    limit = command_service.settings.max_message_bytes
    assert dead_letter.body == (body if len(body) <= limit else body[:TRUNCATED_BODY_BYTES])
    assert str(dead_letter.headers[topology.REASON_HEADER]).startswith(code)

    # The consumer is still alive, and nothing was stored for the bad message: the command
    # log and the event store (fresh for this test) hold the next command and its event only.
    account = uuid.uuid4()
    ok = await client.send_command(OpenAccount(owner_id="dave", currency="EUR"), account)
    assert (ok.status, ok.version) == ("accepted", 1)
    async with command_service.pool.acquire() as connection:
        logged = await connection.fetch("SELECT command_id FROM commands")
        stored = await connection.fetch(
            "SELECT stream_id, metadata->>'causation_id' AS causation FROM events"
        )
    assert [row["command_id"] for row in logged] == [ok.command_id]
    assert [(row["stream_id"], row["causation"]) for row in stored] == [
        (account, str(ok.command_id))
    ]


async def test_command_without_aggregate_header_is_still_handled(
    channel: aio_pika.abc.AbstractChannel, command_service: CommandService
) -> None:
    replies = await channel.declare_queue(exclusive=True)
    commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
    envelope = CommandEnvelope(
        type="OpenAccount",
        aggregate_id=uuid.uuid4(),
        payload={"owner_id": "erin", "currency": "GBP"},
    )
    await commands.publish(
        aio_pika.Message(envelope.model_dump_json().encode(), reply_to=replies.name),
        routing_key="account.OpenAccount",
    )
    [reply_message] = await drain(replies, 1)
    assert Reply.model_validate_json(reply_message.body).status == "accepted"
