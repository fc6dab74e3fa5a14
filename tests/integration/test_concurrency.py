"""Optimistic concurrency under real contention: several processes, one account."""

from __future__ import annotations

import asyncio
import sys
import uuid

import pytest

from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.domains import ledger
from command_service.model.authorization import Actor
from command_service.service_layer.handlers import handle_command
from command_service.service_layer.registry import CommandRegistry
from shared.client import envelope_for
from shared.ledger import OpenAccount

pytestmark = pytest.mark.integration

PROCESSES, DEPOSITS = 3, 40


async def test_concurrent_deposits_from_several_processes_all_land_exactly_once(
    store: PostgresEventStore, pg_dsn: str
) -> None:
    account = uuid.uuid4()
    opened = await handle_command(
        envelope_for(OpenAccount(owner_id="o", currency="EUR"), account),
        store=store,
        actor=Actor.anonymous(),
        registry=CommandRegistry.from_domains([ledger.domain]),
        concurrency_retries=0,
    )
    assert opened.status == "accepted"
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.contend",
            pg_dsn,
            str(account),
            str(DEPOSITS),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(PROCESSES)
    ]
    outputs = await asyncio.gather(*(w.communicate() for w in workers))
    assert [w.returncode for w in workers] == [0] * PROCESSES
    lines = [out.decode().strip().splitlines()[-1] for out, _ in outputs]
    conflicts = sum(int(line.split()[0].removeprefix("conflicts=")) for line in lines)
    assert conflicts > 0, lines  # the processes really raced
    print(f"lost races retried: {conflicts}")

    stream = await store.load_stream(account)
    assert [e.version for e in stream] == list(range(1, PROCESSES * DEPOSITS + 2))
    assert sum(e.data.get("amount", 0) for e in stream) == PROCESSES * DEPOSITS
    causes = {e.metadata["causation_id"] for e in stream[1:]}
    assert len(causes) == PROCESSES * DEPOSITS  # one event per command, none twice
