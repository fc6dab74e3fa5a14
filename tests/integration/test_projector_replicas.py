"""Three projector processes share the partitions of one event stream; one is SIGKILLed mid-way,
and every read model still ends equal to a sequential replay of the event store."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import aio_pika
import pytest

from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.bootstrap import CommandService
from query_service.adapters.mongo import create_client
from shared.client import CommandClient
from shared.ledger import (
    DepositMoney,
    FreezeAccount,
    OpenAccount,
    RequestTransfer,
    UnfreezeAccount,
    WithdrawMoney,
)
from shared.messages import Command, EventEnvelope
from shared.topology import PROJECTOR_PARKED_QUEUE, projector_partition_queue
from tests.conftest import Services
from tests.query_support import eventually
from tests.read_model_support import counts, differences, reference_snapshot, snapshot

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 6
ACCOUNTS = 30
COMMANDS = 260


@dataclass
class Projectors:
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def projected(self, name: str) -> int:
        return self.logs[name].read_text().count('"event_projected"')

    async def counts(self) -> list[int]:
        return [self.projected(name) for name in self.processes]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def consumers(amqp_url: str) -> int:
    """The fewest consumers on any partition queue (0 while one is not declared yet)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        found = []
        for index in range(PARTITIONS):
            queue = await channel.declare_queue(projector_partition_queue(index), passive=True)
            found.append(int(queue.declaration_result.consumer_count or 0))
        return min(found)
    except aio_pika.exceptions.ChannelClosed:
        return 0
    finally:
        await connection.close()


@pytest.fixture
async def projectors(
    broker: str, services: Services, mongo_db: str, tmp_path: Path
) -> AsyncIterator[Projectors]:
    base = {
        **os.environ,
        "CQRS_AMQP_URL": broker,
        "CQRS_MONGO_URL": services.mongo_url,
        "CQRS_MONGO_DB": mongo_db,
        "CQRS_PROJECTOR_PARTITIONS": str(PARTITIONS),
        "CQRS_PROJECTOR_REBALANCE_SECONDS": "0.5",
        "CQRS_PREFETCH": "16",
        "CQRS_LOG_JSON": "true",
        # `event_projected`, counted below per process, is a DEBUG line.
        "CQRS_LOG_LEVEL": "DEBUG",
        "CQRS_HTTP_PORT": str(_free_port()),
    }
    running = Projectors({}, {})
    try:
        # Started one after the other: the first one subscribes to every partition first, so
        # the others only get work because replicas hand partitions over.
        for index, name in enumerate(("api-and-projector", "projector-2", "projector-3")):
            env = {**base, "CQRS_RUN_API": "true" if index == 0 else "false"}
            running.logs[name] = tmp_path / f"{name}.log"
            with running.logs[name].open("wb") as log:
                running.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "query_service"],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            started = index + 1
            await eventually(lambda: consumers(broker), lambda found: found >= started)  # noqa: B023
        yield running
    finally:
        for process in running.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


async def send_all(client: CommandClient, commands: Sequence[tuple[Command, UUID]]) -> list[str]:
    replies = await asyncio.gather(
        *(client.send_command(command, aggregate, timeout=30) for command, aggregate in commands)
    )
    return [reply.status for reply in replies]


async def stored_events(store: PostgresEventStore) -> list[EventEnvelope]:
    found: list[EventEnvelope] = []
    while batch := await store.read_all(found[-1].position if found else 0, 1_000):
        found.extend(event.to_envelope() for event in batch)
    return found


async def settled(store: PostgresEventStore, transfers: set[UUID]) -> list[EventEnvelope]:
    """The whole history once every transfer has finished (the process manager is done)."""

    async def history() -> list[EventEnvelope]:
        return await stored_events(store)

    def finished(events: list[EventEnvelope]) -> bool:
        done = {e.aggregate_id for e in events if e.type in ("TransferCompleted", "TransferFailed")}
        return transfers <= done

    return await eventually(history, finished, timeout=60, interval=0.2)


async def test_three_projectors_share_the_stream_and_survive_a_kill(
    command_service: CommandService,
    client: CommandClient,
    store: PostgresEventStore,
    projectors: Projectors,
    broker: str,
    services: Services,
    mongo_db: str,
) -> None:
    rng = random.Random(42)
    accounts = [uuid4() for _ in range(ACCOUNTS)]
    openings = [
        (OpenAccount(owner_id=f"owner{i % 7}", currency="EUR", initial_deposit=5_000), account)
        for i, account in enumerate(accounts)
    ]
    assert set(await send_all(client, openings)) == {"accepted"}

    transfers: set[UUID] = set()
    work: list[tuple[Command, UUID]] = []
    for _ in range(COMMANDS):
        account = rng.choice(accounts)
        roll = rng.random()
        if roll < 0.35:
            work.append((DepositMoney(amount=rng.randint(1, 500)), account))
        elif roll < 0.6:
            work.append((WithdrawMoney(amount=rng.randint(1, 200)), account))
        elif roll < 0.85:
            transfer = uuid4()
            transfers.add(transfer)
            sink = rng.choice([a for a in accounts if a != account])
            work.append(
                (
                    RequestTransfer(
                        from_account_id=account, to_account_id=sink, amount=rng.randint(1, 300)
                    ),
                    transfer,
                )
            )
        else:
            work.append((FreezeAccount(), account))
            work.append((UnfreezeAccount(), account))

    chunks = [work[i : i + 20] for i in range(0, len(work), 20)]
    victim = None
    for number, chunk in enumerate(chunks):
        await send_all(client, chunk)
        if number == len(chunks) // 3:
            # Mid-way, once the partitions were shared out: kill the busiest replica.
            await eventually(
                projectors.counts, lambda found: sum(1 for n in found if n) >= 2, timeout=20
            )
            victim = max(projectors.processes, key=projectors.projected)
            projectors.processes[victim].send_signal(signal.SIGKILL)
            projectors.processes[victim].wait()

    history = await settled(store, transfers)
    expected = await reference_snapshot(services.mongo_url, history)
    client_db = create_client(services.mongo_url)
    try:
        database = client_db[mongo_db]

        async def live() -> list[str]:
            return differences(await snapshot(database), expected)

        problems = await eventually(live, lambda found: found == [], timeout=90, interval=0.5)
    finally:
        await client_db.close()

    assert problems == []
    assert counts(expected)["accounts"] == ACCOUNTS
    assert counts(expected)["transfers"] == len(transfers)
    survivors = [name for name in projectors.processes if name != victim]
    shared = {name: projectors.projected(name) for name in projectors.processes}
    assert sum(1 for count in shared.values() if count) >= 2, shared
    connection = await aio_pika.connect(broker)
    channel = await connection.channel()
    parked = await channel.declare_queue(PROJECTOR_PARKED_QUEUE, passive=True)
    await connection.close()
    assert parked.declaration_result.message_count == 0
    for name in survivors:
        projectors.processes[name].send_signal(signal.SIGTERM)
    for name in survivors:
        assert projectors.processes[name].wait(timeout=30) == 0, name
    handed_over = [
        json.loads(line)
        for name in projectors.logs
        for line in projectors.logs[name].read_text().splitlines()
        if '"partition_handed_over"' in line
    ]
    assert handed_over, "the first replica kept every partition"
