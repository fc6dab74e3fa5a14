"""Parked events on the real broker: counted, listed without being lost, replayed into their
partition once the gap is filled, dropped by id; through the functions and `cqrs parked`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import aio_pika
import pytest
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from pymongo.asynchronous.database import AsyncDatabase

from cqrs_cli.parked_command import list_parked, parked_count, replay_parked
from query_service.adapters.mongo import create_client
from query_service.bootstrap import ProjectorRuntime, start_projector
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.service_layer.projector import GapPolicy
from query_service.settings import QueryServiceSettings
from shared.ledger import MoneyDeposited
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Services
from tests.query_support import (
    ACCOUNTS,
    envelope,
    eventually,
    opened_account,
    publish,
    relay_message,
    served,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CQRS = Path(sys.executable).with_name("cqrs")


@pytest.fixture
def settings(broker: str, services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=2,
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
    runtime = await start_projector(
        settings, database, gap_policy=GapPolicy(attempts=2, delay_seconds=0.05)
    )
    yield runtime
    await runtime.stop(grace_seconds=5)


@pytest.fixture
async def connection(broker: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(broker)
    yield connection
    await connection.close()


@pytest.fixture
async def events(
    projector: ProjectorRuntime, connection: AbstractRobustConnection
) -> AbstractExchange:
    channel = await connection.channel()
    return await channel.get_exchange(EVENTS_EXCHANGE)


async def balance(database: AsyncDatabase[Document], account: object) -> tuple[int, int] | None:
    found = await database[ACCOUNTS].find_one({"_id": str(account)})
    return None if found is None else (found["balance"], found["version"])


async def run_cli(settings: QueryServiceSettings, *args: str) -> str:
    env = {**os.environ, "CQRS_AMQP_URL": settings.amqp_url, "CQRS_LOG_JSON": "true"}
    process = await asyncio.create_subprocess_exec(
        str(CQRS),
        "parked",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_parked_events_are_listed_replayed_and_dropped(
    settings: QueryServiceSettings,
    projector: ProjectorRuntime,
    events: AbstractExchange,
    connection: AbstractRobustConnection,
    database: AsyncDatabase[Document],
) -> None:
    account = uuid4()
    for event in opened_account(account, deposit=100):
        await publish(events, event)
    missing = envelope(account, 3, MoneyDeposited(amount=10))
    ahead = envelope(account, 4, MoneyDeposited(amount=1))
    garbage = envelope(account, 5, MoneyDeposited(amount=1))
    await events.publish(relay_message(garbage, body=b"{not json"), routing_key=garbage.routing_key)
    await publish(events, ahead)  # version 3 is not there: held, then parked
    await eventually(lambda: parked_count(connection), lambda count: count == 2)

    # The unreadable one is parked at once, the early one after waiting for the gap (in a
    # batch with both, the unreadable one comes first and is settled first).
    listed = sorted(await list_parked(connection), key=lambda parked: parked.version or 0)
    listed_again = await list_parked(connection, limit=1)

    assert [(p.message_id, p.version) for p in listed] == [
        (str(ahead.event_id), 4),
        (str(garbage.event_id), 5),
    ]
    assert listed[0].reason.startswith("version gap in projection accounts")
    assert listed[0].routing_key == "account.MoneyDeposited"
    assert listed[1].reason.startswith("malformed JSON")
    assert [p.message_id for p in listed_again] == [str(garbage.event_id)]  # oldest first
    assert await parked_count(connection) == 2  # listing took nothing away
    assert projector.consumer.metrics.parked == 2

    app = create_app(settings, database=database, metrics=projector.consumer.metrics)
    async with served(app) as api:
        ready = (await api.get("/readyz")).json()
    assert ready["detail"]["parked"]["queue"] == 2
    assert ready["detail"]["parked"]["this_process"] == 2

    await publish(events, missing)
    await eventually(lambda: balance(database, account), lambda state: state == (110, 3))
    replayed = await replay_parked(connection, message_ids={str(ahead.event_id)})

    assert (replayed.moved, replayed.left) == (1, 1)
    assert await eventually(lambda: balance(database, account), lambda s: s == (111, 4))

    printed = json.loads(await run_cli(settings, "list"))
    assert [item["message_id"] for item in printed] == [str(garbage.event_id)]
    dropped = json.loads(await run_cli(settings, "drop", "--id", str(garbage.event_id)))
    assert dropped == {"dropped": 1, "still_parked": 0}
    assert await parked_count(connection) == 0


async def test_replaying_everything_parks_again_what_still_fails_without_looping(
    settings: QueryServiceSettings,
    projector: ProjectorRuntime,
    events: AbstractExchange,
    connection: AbstractRobustConnection,
) -> None:
    account = uuid4()
    for event in opened_account(account):
        await publish(events, event)
    stuck = envelope(account, 9, MoneyDeposited(amount=1))
    await publish(events, stuck)
    await eventually(lambda: parked_count(connection), lambda count: count == 1)

    result = json.loads(await run_cli(settings, "replay"))

    assert result == {"replayed": 1, "still_parked": 0}
    await eventually(lambda: parked_count(connection), lambda count: count == 1)
    again = await list_parked(connection)
    assert [p.message_id for p in again] == [str(stuck.event_id)]
