"""Replays for read-model rebuilds, answered by the running command service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.bootstrap import CommandService
from shared import topology
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount, RequestTransfer
from shared.messages import EventEnvelope, ReplayProgress, ReplayRequest

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(broker)
    yield await connection.channel()
    await connection.close()


async def request_replay(
    channel: AbstractChannel, **fields: object
) -> list[AbstractIncomingMessage]:
    """Ask for a replay and collect the stream up to its `ReplayFinished` frame."""
    reply: AbstractQueue = await channel.declare_queue(exclusive=True)
    request = ReplayRequest.model_validate({"reply_queue": reply.name, **fields})
    exchange = await channel.get_exchange(topology.REPLAY_EXCHANGE)
    await exchange.publish(
        aio_pika.Message(request.model_dump_json().encode()),
        routing_key=topology.REPLAY_REQUESTS_QUEUE,
    )
    received: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(15):
        while not received or received[-1].type != topology.REPLAY_FINISHED:
            message = await reply.get(fail=False)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            await message.ack()
            received.append(message)
    return received


async def some_history(client: CommandClient) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await client.send_command(OpenAccount(owner_id="o", currency="EUR", initial_deposit=50), a)
    await client.send_command(OpenAccount(owner_id="p", currency="EUR"), b)
    for amount in (1, 2, 3):
        await client.send_command(DepositMoney(amount=amount), a)
    await client.send_command(
        RequestTransfer(from_account_id=a, to_account_id=b, amount=10), uuid.uuid4()
    )


async def test_replay_streams_every_stored_event_in_position_order(
    command_service: CommandService,
    client: CommandClient,
    channel: AbstractChannel,
    store: PostgresEventStore,
) -> None:
    await some_history(client)
    await asyncio.sleep(0.5)  # let the transfer's process manager finish its steps
    stored = await store.read_all(0, 1000)
    messages = await request_replay(channel)

    started, *events, finished = messages
    assert (started.type, finished.type) == (topology.REPLAY_STARTED, topology.REPLAY_FINISHED)
    progress = ReplayProgress.model_validate_json(started.body)
    assert progress.total == len(events)
    assert progress.up_to_position >= stored[-1].position
    envelopes = [EventEnvelope.model_validate_json(m.body) for m in events]
    assert envelopes[: len(stored)] == [e.to_envelope() for e in stored]
    assert [e.position for e in envelopes] == sorted(e.position for e in envelopes)
    assert all(m.message_id == str(e.event_id) for m, e in zip(events, envelopes, strict=True))


async def test_replay_honours_the_range_and_the_aggregate_types(
    command_service: CommandService,
    client: CommandClient,
    channel: AbstractChannel,
    store: PostgresEventStore,
) -> None:
    await some_history(client)
    await asyncio.sleep(0.5)
    stored = await store.read_all(0, 1000)
    _, *events, _ = await request_replay(
        channel, after_position=2, up_to_position=stored[-2].position, aggregate_types=["transfer"]
    )
    expected = [
        e.event_id for e in stored[:-1] if e.position > 2 and e.aggregate_type == "transfer"
    ]
    assert [EventEnvelope.model_validate_json(m.body).event_id for m in events] == expected


async def test_a_malformed_request_is_dropped_and_the_server_keeps_answering(
    command_service: CommandService, client: CommandClient, channel: AbstractChannel
) -> None:
    await channel.default_exchange.publish(
        aio_pika.Message(b"{not json"), routing_key=topology.REPLAY_REQUESTS_QUEUE
    )
    await some_history(client)
    started, *_ = await request_replay(channel)
    assert ReplayProgress.model_validate_json(started.body).total > 0
