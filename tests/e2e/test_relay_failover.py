"""Two command-service processes on one event store and one broker: one relay publishes at a
time, and when the leader dies the standby takes over."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from command_service.adapters.postgres_event_store import read_all
from command_service.adapters.relay import RELAY_SUBSCRIPTION
from shared import topology
from shared.client import CommandClient
from shared.ledger import OpenAccount
from tests.e2e.conftest import CommandReplicas, free_port
from tests.metrics_support import scrape, value
from tests.query_support import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture
async def database(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


class Replica:
    """One command-service process and its HTTP endpoint."""

    def __init__(self, replicas: CommandReplicas) -> None:
        self.port = free_port()
        replicas.env["CQRS_HTTP_PORT"] = str(self.port)
        self.process: subprocess.Popen[bytes] = replicas.spawn()

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"http://127.0.0.1:{self.port}/status")
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        return status

    async def leading(self) -> bool:
        return bool((await self.status())["relay"]["leading"])

    async def published(self) -> float:
        """Events its relay published with a confirm."""
        async with httpx.AsyncClient(timeout=5) as http:
            samples = await scrape(http, f"http://127.0.0.1:{self.port}/metrics")
        return value(samples, "cqrs_events_published_total")


async def open_accounts(client: CommandClient, count: int) -> None:
    replies = await asyncio.gather(
        *(
            client.send_command(OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4(), timeout=30)
            for _ in range(count)
        )
    )
    # A command the killed replica committed but did not answer is answered by the other one,
    # from the command log.
    assert {reply.status for reply in replies} <= {"accepted", "duplicate"}


async def test_one_relay_publishes_at_a_time_and_the_standby_takes_over_when_the_leader_dies(
    command_replicas: CommandReplicas, broker: str, database: asyncpg.Connection
) -> None:
    replicas = [Replica(command_replicas), Replica(command_replicas)]
    await command_replicas.wait_balanced(2)
    connection = await aio_pika.connect(broker)
    sending: asyncio.Task[None] | None = None
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(topology.EVENTS_EXCHANGE, routing_key="#")
        seen: Counter[str] = Counter()

        async def on_event(message: AbstractIncomingMessage) -> None:
            seen[str(message.message_id)] += 1

        await queue.consume(on_event, no_ack=True)

        async def all_stored_seen() -> int:
            """The last stored position, once every stored event has arrived at least once."""
            stored = await read_all(database, 0, 100_000)
            missing = [e for e in stored if seen[str(e.event_id)] == 0]
            return -1 if missing else (stored[-1].position if stored else 0)

        async def head() -> int:
            return int(await database.fetchval("SELECT last FROM event_position"))

        async def relay_checkpoint() -> int:
            position = await database.fetchval(
                "SELECT position FROM checkpoints WHERE name = $1", RELAY_SUBSCRIPTION
            )
            return int(position or 0)

        async with asyncio.timeout(120), await CommandClient.connect(broker) as client:
            # Both replicas run: every event is published, and by one relay only.
            for _ in range(3):
                await open_accounts(client, 10)
            both_ran_until = await eventually(all_stored_seen, lambda last: last == 30)
            # The leader recorded all of it, so no handover may publish any of it again.
            await eventually(relay_checkpoint, lambda position: position == both_ran_until)
            leading = [await replica.leading() for replica in replicas]
            assert sorted(leading) == [False, True]
            leader, standby = replicas if leading[0] else replicas[::-1]
            assert (await leader.published(), await standby.published()) == (30, 0)

            # The leader dies while commands keep coming; the standby takes over.
            handed_over = asyncio.Event()

            async def keep_sending() -> None:
                while not handed_over.is_set():
                    await open_accounts(client, 2)

            sending = asyncio.create_task(keep_sending())
            await eventually(head, lambda position: position >= both_ran_until + 10)
            leader.process.send_signal(signal.SIGKILL)
            leader.process.wait()
            await eventually(standby.leading, bool)
            handed_over.set()
            await sending
            handed_over_at = await head()

            # What comes next is published by the new leader.
            await open_accounts(client, 10)
            await eventually(all_stored_seen, lambda last: last == handed_over_at + 10)
        assert await standby.published() >= 10
        # The new leader publishes in position order on one channel, so by the time its last
        # event arrived, anything it had published while it was the standby arrived before it,
        # and the dead leader publishes nothing more: the counts are final. At-least-once allows
        # a duplicate only around the handover (a batch the dead leader published but had not
        # recorded), never up to the checkpoint both relays ran under, nor after the new
        # leader took over.
        stored = await read_all(database, 0, 100_000)
        counts = {event.position: seen[str(event.event_id)] for event in stored}
        assert [p for p, n in counts.items() if n != 1 and p <= both_ran_until] == []
        assert [p for p, n in counts.items() if n != 1 and p > handed_over_at] == []
        assert all(n >= 1 for n in counts.values())
    finally:
        if sending is not None:
            sending.cancel()
        await connection.close()
