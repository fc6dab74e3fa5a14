"""Command-service processes that die at the worst moment, and several replicas at once."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from command_service.adapters.migrations import migrate
from command_service.adapters.postgres_event_store import read_all
from shared import topology
from shared.client import CommandClient, envelope_for
from shared.ledger import DepositMoney, OpenAccount, WithdrawMoney
from shared.messages import EventEnvelope, Reply
from tests.e2e.conftest import CommandReplicas

pytestmark = pytest.mark.e2e


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(broker)
    yield await connection.channel()
    await connection.close()


async def capture_events(channel: AbstractChannel) -> AbstractQueue:
    exchange = await channel.declare_exchange(
        topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    return queue


async def drain(queue: AbstractQueue, count: int, timeout: float = 20) -> list[EventEnvelope]:
    found: list[EventEnvelope] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            await message.ack()
            found.append(EventEnvelope.model_validate_json(message.body))
    return found


async def drain_through(
    queue: AbstractQueue, last_cause: uuid.UUID, timeout: float = 20
) -> list[EventEnvelope]:
    """Every event up to and including the first one caused by command `last_cause`."""
    found: list[EventEnvelope] = []
    async with asyncio.timeout(timeout):
        while not found or found[-1].metadata.causation_id != str(last_cause):
            found += await drain(queue, 1, timeout)
    return found


async def test_events_committed_before_a_sigkill_are_published_exactly_once_after_restart(
    command_replicas: CommandReplicas, pg_dsn: str, channel: AbstractChannel, broker: str
) -> None:
    events = await capture_events(channel)
    holder = await asyncpg.connect(pg_dsn)
    await migrate(holder)
    # Hold the relay's leadership lock: the service commits events but cannot publish them.
    await holder.execute("SELECT pg_advisory_lock(hashtext('cqrs.sub.relay'))")
    replica = command_replicas.spawn()
    await command_replicas.wait_balanced(1)
    async with await CommandClient.connect(broker) as client:
        replies = await asyncio.gather(
            *(
                client.send_command(OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4())
                for _ in range(20)
            )
        )
    assert {r.status for r in replies} == {"accepted"}
    stored = await read_all(holder, 0, 100)
    assert len(stored) == 20

    replica.send_signal(signal.SIGKILL)
    replica.wait()
    # Committed, and no relay recorded publishing any of it (the checkpoint follows the confirms).
    assert await holder.fetchval("SELECT position FROM checkpoints WHERE name = 'relay'") is None
    await holder.close()  # releases the lock, as a dead relay's connection would

    command_replicas.spawn()
    async with await CommandClient.connect(broker) as client:
        later = await client.send_command(
            OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4(), timeout=30
        )
    # The relay publishes in position order, so everything published before the later command's
    # event has arrived with it: each stored event exactly once, none published by the killed
    # replica (its copies would have come first).
    published = await drain_through(events, later.command_id)
    assert [e.event_id for e in published[:-1]] == [e.event_id for e in stored]


async def test_three_replicas_keep_each_aggregates_command_order_through_a_crash(
    command_replicas: CommandReplicas, broker: str
) -> None:
    """A deposit followed at once by a withdrawal of the same amount is never refused."""
    first = command_replicas.spawn()
    await command_replicas.wait_balanced(1)
    for _ in range(2):
        command_replicas.spawn()
    assert await command_replicas.wait_balanced(3) == [2, 2, 2]
    accounts = [uuid.uuid4() for _ in range(200)]
    async with await CommandClient.connect(broker) as client:
        opened = await asyncio.gather(
            *(client.send_command(OpenAccount(owner_id="o", currency="EUR"), a) for a in accounts)
        )
        assert {r.status for r in opened} == {"accepted"}

        async def deposit_then_withdraw(account: uuid.UUID) -> tuple[Reply, Reply]:
            # Published back to back on one channel: the withdrawal right behind the deposit.
            deposit = asyncio.ensure_future(
                client.send(envelope_for(DepositMoney(amount=100), account), "account", timeout=30)
            )
            withdrawal = asyncio.ensure_future(
                client.send(envelope_for(WithdrawMoney(amount=100), account), "account", timeout=30)
            )
            return await deposit, await withdrawal

        pairs = asyncio.gather(*(deposit_then_withdraw(a) for a in accounts))
        await asyncio.sleep(0.3)
        first.send_signal(signal.SIGKILL)  # its partitions pass to the other two
        first.wait()
        results = await pairs
    assert await command_replicas.wait_balanced(2) == [3, 3]
    statuses = [(d.status, w.status, w.error) for d, w in results]
    refused = [s for s in statuses if s[1] == "rejected"]
    assert refused == []
    assert {s[0] for s in statuses} <= {"accepted", "duplicate"}
