"""The projector on a real RabbitMQ and MongoDB: events in, read model out, bad input parked."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.broker import (
    ORIGINAL_ROUTING_KEY_HEADER,
    ProjectorTopology,
    declare_projector_topology,
    parked_bounds,
)
from query_service.adapters.mongo import create_client
from query_service.bootstrap import ProjectorRuntime, start_projector
from query_service.projections.store import Document
from query_service.service_layer.projector import GapPolicy
from query_service.settings import QueryServiceSettings
from shared.ledger import AccountOpened, MoneyDeposited, MoneyWithdrawn
from shared.topology import (
    EVENTS_EXCHANGE,
    PROJECTOR_PARKED_QUEUE,
    REASON_HEADER,
    projector_partition_queue,
)
from tests.conftest import Services
from tests.query_support import (
    ACCOUNTS,
    envelope,
    eventually,
    opened_account,
    publish,
    relay_message,
)

pytestmark = pytest.mark.integration

PARTITIONS = 4
FAST_GAPS = GapPolicy(attempts=3, delay_seconds=0.05)


@pytest.fixture
def settings(broker: str, services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=PARTITIONS,
        prefetch=16,
    )


@pytest.fixture
async def database(settings: QueryServiceSettings) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(settings.mongo_url)
    yield client[settings.mongo_db]
    await client.close()


@pytest.fixture
async def projector(
    settings: QueryServiceSettings, database: AsyncDatabase[Document]
) -> AsyncIterator[ProjectorRuntime]:
    runtime = await start_projector(settings, database, gap_policy=FAST_GAPS)
    yield runtime
    await runtime.stop(grace_seconds=5)


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[AbstractChannel]:
    connection: AbstractRobustConnection = await aio_pika.connect_robust(broker)
    yield await connection.channel()
    await connection.close()


@pytest.fixture
async def events(projector: ProjectorRuntime, channel: AbstractChannel) -> AbstractExchange:
    """The relay's side: the events exchange, once the projector has declared its topology."""
    return await channel.get_exchange(EVENTS_EXCHANGE)


async def account_state(
    database: AsyncDatabase[Document], account_id: UUID
) -> tuple[int, int] | None:
    found = await database[ACCOUNTS].find_one({"_id": str(account_id)})
    return None if found is None else (found["balance"], found["version"])


async def parked_messages(
    channel: AbstractChannel, count: int, *, timeout: float = 20.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    queue = await channel.get_queue(PROJECTOR_PARKED_QUEUE)
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
        else:
            found.append(message)
    return found


async def parked_now(channel: AbstractChannel) -> int:
    """How many messages are parked at this moment, without waiting.

    Call it once a later event of every aggregate involved was applied: a partition settles one
    aggregate's messages in order, and parks a message (confirmed by the broker) before it
    settles it, so whatever was going to be parked before that event is parked by then.
    """
    queue = await channel.declare_queue(PROJECTOR_PARKED_QUEUE, passive=True)
    return queue.declaration_result.message_count or 0


async def test_projects_published_events_exactly_once(
    events: AbstractExchange, database: AsyncDatabase[Document], channel: AbstractChannel
) -> None:
    account_id = uuid4()
    withdrawal = envelope(account_id, 3, MoneyWithdrawn(amount=250))
    stream = [
        *opened_account(account_id, deposit=1_000),
        withdrawal,
        envelope(account_id, 4, MoneyDeposited(amount=40)),
        withdrawal,  # redelivered by the relay after a lost confirm
        envelope(account_id, 5, MoneyDeposited(amount=1)),
    ]
    for event in stream:
        await publish(events, event)

    # Version 5 follows the duplicate in the same partition, so the duplicate was handled by then.
    state = await eventually(lambda: account_state(database, account_id), lambda s: s == (791, 5))

    assert state == (791, 5)
    assert await parked_now(channel) == 0


async def test_projects_interleaved_accounts_in_per_account_order(
    events: AbstractExchange, database: AsyncDatabase[Document], channel: AbstractChannel
) -> None:
    accounts = [uuid4() for _ in range(6)]
    streams = {
        account_id: [
            *opened_account(account_id, deposit=100),
            *(envelope(account_id, v, MoneyDeposited(amount=v)) for v in range(3, 23)),
        ]
        for account_id in accounts
    }
    for batch in zip(*streams.values(), strict=True):
        for event in batch:
            await publish(events, event)

    expected = 100 + sum(range(3, 23))
    for account_id in accounts:
        state = await eventually(
            functools.partial(account_state, database, account_id),
            lambda s: s is not None and s[1] == 22,
        )
        assert state == (expected, 22)
    # Per-account order held under prefetch 16: nothing hit a gap and got parked.
    assert await parked_now(channel) == 0


async def test_parks_bad_messages_with_a_reason_and_keeps_going(
    events: AbstractExchange, database: AsyncDatabase[Document], channel: AbstractChannel
) -> None:
    account_id = uuid4()
    for event in opened_account(account_id, deposit=100):
        await publish(events, event)
    template = envelope(account_id, 3, MoneyDeposited(amount=5))

    await events.publish(
        relay_message(template, body=b'{"event_id": "oops", '), routing_key=template.routing_key
    )
    renamed = envelope(account_id, 3, MoneyDeposited(amount=5), event_type="AccountRenamed")
    await publish(events, renamed)
    invalid = template.model_copy(update={"data": {"amount": "five"}})
    await publish(events, invalid)
    await publish(events, template)

    assert await eventually(
        lambda: account_state(database, account_id), lambda s: s == (105, 3)
    ) == (105, 3)
    parked = await parked_messages(channel, 2)
    reasons = sorted(str((message.headers or {})[REASON_HEADER]) for message in parked)
    assert len(reasons) == 2, reasons  # the event no projection handles is not parked
    assert reasons[0].startswith("invalid event for projection accounts: MoneyDeposited data")
    assert reasons[1].startswith("malformed JSON")
    by_reason = {str((m.headers or {})[REASON_HEADER])[:7]: m for m in parked}
    assert by_reason["malform"].body == b'{"event_id": "oops", '
    assert (by_reason["invalid"].headers or {})[ORIGINAL_ROUTING_KEY_HEADER] == (
        "account.MoneyDeposited"
    )
    assert by_reason["invalid"].message_id == str(invalid.event_id)


async def test_parks_an_event_after_a_gap_and_applies_it_once_replayed_in_order(
    events: AbstractExchange, database: AsyncDatabase[Document], channel: AbstractChannel
) -> None:
    account_id = uuid4()
    opening = envelope(account_id, 1, AccountOpened(owner_id="dave", currency="EUR"))
    deposit = envelope(account_id, 2, MoneyDeposited(amount=10))
    later = envelope(account_id, 3, MoneyDeposited(amount=7))
    await publish(events, opening)
    await publish(events, later)

    parked = await parked_messages(channel, 1)

    assert len(parked) == 1
    assert str((parked[0].headers or {})[REASON_HEADER]).startswith(
        f"version gap in projection accounts: aggregate {account_id} is at version 1, "
        "event MoneyDeposited has version 3 (expected 2)"
    )
    assert await account_state(database, account_id) == (0, 1)

    await publish(events, deposit)
    await publish(events, later)
    assert await eventually(
        lambda: account_state(database, account_id), lambda s: s == (17, 3)
    ) == (17, 3)


async def test_a_second_replica_takes_over_when_the_first_stops(
    settings: QueryServiceSettings,
    projector: ProjectorRuntime,
    events: AbstractExchange,
    database: AsyncDatabase[Document],
    channel: AbstractChannel,
) -> None:
    standby = await start_projector(settings, database, gap_policy=FAST_GAPS)
    try:
        accounts = [uuid4() for _ in range(4)]
        for account_id in accounts:
            for event in opened_account(account_id, deposit=50):
                await publish(events, event)
        for account_id in accounts:
            await eventually(
                functools.partial(account_state, database, account_id), lambda s: s == (50, 2)
            )

        await projector.stop(grace_seconds=5)
        for version in range(3, 13):
            for account_id in accounts:
                await publish(events, envelope(account_id, version, MoneyDeposited(amount=1)))

        for account_id in accounts:
            state = await eventually(
                functools.partial(account_state, database, account_id), lambda s: s == (60, 12)
            )
            assert state == (60, 12)
        assert await parked_now(channel) == 0
    finally:
        await standby.stop(grace_seconds=5)


async def test_declares_single_active_consumer_partitions(
    projector: ProjectorRuntime, channel: AbstractChannel
) -> None:
    for index in range(PARTITIONS):
        # A passive declare with other arguments than the real queue's would close the channel.
        queue = await channel.declare_queue(projector_partition_queue(index), passive=True)
        assert (queue.declaration_result.consumer_count or 0) >= 1
    assert [queue.arguments for queue in projector.topology.partition_queues] == [
        {"x-single-active-consumer": True, "x-dead-letter-exchange": "cqrs.projector.parked"}
    ] * PARTITIONS


async def test_partitions_by_aggregate_id_over_all_queues(channel: AbstractChannel) -> None:
    topology = await declare_projector_topology(
        channel, ProjectorTopology(PARTITIONS, parked=parked_bounds(1_000, 1_048_576))
    )
    exchange = await channel.get_exchange(EVENTS_EXCHANGE)
    account_ids = [uuid4() for _ in range(200)]
    for account_id in account_ids:
        await publish(
            exchange, envelope(account_id, 1, AccountOpened(owner_id="o", currency="EUR"))
        )
    for account_id in account_ids[:20]:
        await publish(exchange, envelope(account_id, 2, MoneyDeposited(amount=1)))

    queues_of: dict[str, set[int]] = {}

    async def drain() -> int:
        for index, queue in enumerate(topology.partition_queues):
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                queues_of.setdefault(str((message.headers or {})["aggregate_id"]), set()).add(index)
        return sum(len(indexes) for indexes in queues_of.values())

    await eventually(drain, lambda _: len(queues_of) == len(account_ids))

    # Every aggregate lives in exactly one partition, and every partition gets a share.
    assert all(len(indexes) == 1 for indexes in queues_of.values())
    used = {index for indexes in queues_of.values() for index in indexes}
    assert used == set(range(PARTITIONS))
