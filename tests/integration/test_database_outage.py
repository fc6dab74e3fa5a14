"""PostgreSQL going away: commands wait and are retried, never acked early or dead-lettered."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from command_service.bootstrap import start
from command_service.settings import CommandServiceSettings
from shared import topology
from shared.client import CommandClient, envelope_for
from shared.ledger import DepositMoney, OpenAccount, WithdrawMoney
from shared.messages import Command, Reply
from tests.metrics_support import scrape, value
from tests.query_support import eventually
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


async def test_an_outage_longer_than_the_retry_window_requeues_commands_and_keeps_their_order(
    command_settings: CommandServiceSettings, postgres_proxy: TcpProxy, broker: str
) -> None:
    """Past `CQRS_COMMAND_RETRY_SECONDS` the command in hand goes back to its queue: never acked,
    never dead-lettered, and handled once, in order with the others, when the database returns.

    The cut also takes the partition leases' connection, so within about a second the replica
    gives its partitions up (after the message in hand is settled) and takes them again once
    the database is back; the commands wait in their queues meanwhile.
    """
    settings = command_settings.model_copy(
        update={
            "postgres_dsn": through(postgres_proxy, command_settings.postgres_dsn),
            "command_retry_seconds": 1.0,
        }
    )
    service = await start(settings)
    assert service.http is not None
    metrics = f"http://127.0.0.1:{service.http.port}/metrics"
    connection = await aio_pika.connect(broker)
    try:
        channel = await connection.channel()  # with publisher confirms: published in order
        commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        reply_queue = await channel.declare_queue(exclusive=True)
        replies: dict[str, Reply] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            replies[str(message.correlation_id)] = Reply.model_validate_json(message.body)

        await reply_queue.consume(on_reply, no_ack=True)

        async def publish(command: Command, account: uuid.UUID) -> str:
            envelope = envelope_for(command, account)
            await commands.publish(
                aio_pika.Message(
                    envelope.model_dump_json().encode(),
                    content_type="application/json",
                    message_id=str(envelope.command_id),
                    correlation_id=str(envelope.command_id),
                    reply_to=reply_queue.name,
                    headers={topology.AGGREGATE_ID_HEADER: str(account)},
                ),
                routing_key=topology.routing_key(command.aggregate_type, envelope.type),
            )
            return str(envelope.command_id)

        async def answered(command_ids: list[str]) -> list[Reply]:
            async def missing() -> int:
                return len(set(command_ids) - set(replies))

            await eventually(missing, lambda count: count == 0, timeout=60)
            return [replies[command_id] for command_id in command_ids]

        async def settled(outcome: str) -> float:
            async with httpx.AsyncClient() as http:
                samples = await scrape(http, metrics)
            return sum(
                value(samples, "cqrs_commands_total", type=kind, outcome=outcome)
                for kind in ("DepositMoney", "WithdrawMoney")
            )

        account = uuid.uuid4()
        [opened] = await answered(
            [await publish(OpenAccount(owner_id="o", currency="EUR"), account)]
        )
        assert (opened.status, opened.version) == ("accepted", 1)

        await postgres_proxy.cut()
        # Each withdrawal takes what the deposit just before it brought: out of order, one of
        # them would be refused for want of funds.
        sent = []
        for amount in (10, 20, 30):
            sent.append(await publish(DepositMoney(amount=amount), account))
            sent.append(await publish(WithdrawMoney(amount=amount), account))
        # The window ran out for the command in hand, and it went back to its queue.
        await eventually(lambda: settled("requeued"), lambda count: count >= 1, timeout=30)
        assert set(replies) == {str(opened.command_id)}  # nothing answered, so nothing acked
        await postgres_proxy.restore()

        handled = await answered(sent)
        assert [(r.status, r.version) for r in handled] == [("accepted", v) for v in range(2, 8)]
        dead = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
        assert dead.declaration_result.message_count == 0
        # Handled once each: six settled as accepted, none as a duplicate, and one event per
        # command, in the order they were sent.
        assert (await settled("accepted"), await settled("duplicate")) == (6, 0)
        async with service.pool.acquire() as db:
            rows = await db.fetch(
                """SELECT version, metadata->>'causation_id' AS causation FROM events
                   WHERE stream_id = $1 AND version > 1 ORDER BY version""",
                account,
            )
        assert [(row["version"], row["causation"]) for row in rows] == list(
            zip(range(2, 8), sent, strict=True)
        )
    finally:
        await connection.close()
        await service.stop()


async def test_appends_failing_while_the_leases_stay_up_keep_the_partitions_order(
    command_settings: CommandServiceSettings, broker: str, pg_dsn: str
) -> None:
    """The database answers, but every append fails (here: its lock wait is cancelled) for
    longer than the retry window, while the partition leases stay held: the partition's
    consumer must not go on with the commands delivered behind the one it gives back."""
    settings = command_settings.model_copy(update={"command_retry_seconds": 0.5})
    service = await start(settings)
    holder = await asyncpg.connect(pg_dsn)
    canceller = await asyncpg.connect(pg_dsn)
    try:
        async with await CommandClient.connect(broker) as client:
            account = uuid.uuid4()
            opened = await client.send_command(OpenAccount(owner_id="o", currency="EUR"), account)
            assert opened.status == "accepted"
            async with holder.transaction():
                # Every append waits for this row lock, and every wait is cancelled: the
                # appends fail as a database in trouble makes them fail, again and again.
                await holder.execute("SELECT last FROM event_position FOR UPDATE")

                async def cancel_lock_waits() -> None:
                    while True:
                        await canceller.execute(
                            """SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                               WHERE wait_event_type = 'Lock'
                                 AND datname = current_database()"""
                        )
                        await asyncio.sleep(0.05)

                cancelling = asyncio.create_task(cancel_lock_waits())
                sent = [
                    asyncio.create_task(client.send_command(command, account, timeout=60))
                    for amount in (10, 20, 30)
                    for command in (DepositMoney(amount=amount), WithdrawMoney(amount=amount))
                ]
                await asyncio.sleep(3)  # several retry windows go by
                cancelling.cancel()
                await asyncio.gather(cancelling, return_exceptions=True)
            replies = [await reply for reply in sent]
        # Each withdrawal came after its deposit, so none may be short of funds.
        assert [(r.status, r.version) for r in replies] == [("accepted", v) for v in range(2, 8)]
    finally:
        await canceller.close()
        await holder.close()
        await service.stop()
