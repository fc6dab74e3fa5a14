"""PostgreSQL going away: commands wait and are retried, never acked early or dead-lettered."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from command_service.bootstrap import start
from shared import topology
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount
from shared.settings import CommandServiceSettings
from tests.tcp_proxy import TcpProxy, through

pytestmark = pytest.mark.integration


async def test_a_command_sent_while_the_database_is_down_is_handled_when_it_returns(
    command_settings: CommandServiceSettings, postgres_proxy: TcpProxy, broker: str
) -> None:
    settings = command_settings.model_copy(
        update={"postgres_dsn": through(postgres_proxy, command_settings.postgres_dsn)}
    )
    service = await start(settings)
    connection = await aio_pika.connect(broker)
    try:
        channel = await connection.channel()
        events = await channel.declare_queue(exclusive=True)
        await events.bind(topology.EVENTS_EXCHANGE, routing_key="account.MoneyDeposited")
        async with await CommandClient.connect(broker) as client:
            account = uuid.uuid4()
            opened = await client.send_command(
                OpenAccount(owner_id="o", currency="EUR", initial_deposit=10), account
            )
            assert opened.status == "accepted"
            await postgres_proxy.cut()
            deposit = asyncio.create_task(
                client.send_command(DepositMoney(amount=5), account, timeout=60)
            )
            await asyncio.sleep(3)
            assert not deposit.done()  # not answered, so not acked, while the database is away
            await postgres_proxy.restore()
            reply = await deposit
        assert (reply.status, reply.version) == ("accepted", 3)
        dead = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
        assert dead.declaration_result.message_count == 0
        # The relay recovered too: both deposits reach the events exchange, in order. A batch
        # confirmed just before the cut may come again, as the same event (same message id).
        received: list[tuple[object, str | None]] = []
        async with asyncio.timeout(20):
            while {version for version, _ in received} != {2, 3}:
                message = await events.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                await message.ack()
                received.append((message.headers["version"], message.message_id))
        assert len(set(received)) == 2  # at most redeliveries of the same event ids
        first_seen = [
            version for i, (version, _) in enumerate(received) if received[i] not in received[:i]
        ]
        assert first_seen == [2, 3]
    finally:
        await connection.close()
        await service.stop()
