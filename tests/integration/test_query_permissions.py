"""The query service does all its broker work as the least-privilege `query` user of
scripts/rabbitmq-users: projecting, readiness, parked-event tooling and replays for rebuilds."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from cqrs_cli.parked_command import list_parked, replay_parked
from query_service.adapters.mongo import create_client
from query_service.adapters.replay_source import AmqpReplaySource
from query_service.bootstrap import start_projector
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.service_layer.projector import GapPolicy
from query_service.service_layer.rebuild import Rebuild, RebuildPolicy
from query_service.settings import QueryServiceSettings
from shared.ledger import MoneyDeposited
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Services
from tests.query_support import envelope, eventually, opened_account, publish
from tests.read_model_support import ledger_catalog
from tests.replay_support import FakeReplayServer

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parents[2] / "scripts" / "rabbitmq-users"


@pytest.fixture
async def query_user(broker: str) -> AsyncIterator[str]:
    """The AMQP URL of a fresh `query` user in the test vhost."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("this test creates broker users with rabbitmqctl, which is not on PATH")
    vhost = unquote(urlsplit(broker).path.lstrip("/")) or "/"
    prefix = f"q{uuid.uuid4().hex[:6]}-"
    run = await asyncio.create_subprocess_exec(
        "bash", str(SCRIPT), "--vhost", vhost, "--prefix", prefix, stdout=subprocess.PIPE
    )
    out, _ = await run.communicate()
    assert run.returncode == 0
    urls = dict(line.split(" ", 1) for line in out.decode().splitlines())
    yield urls["query"]
    for role in urls:
        delete = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", "delete_user", f"{prefix}{role}", stdout=subprocess.DEVNULL
        )
        await delete.wait()
        (SCRIPT.parents[1] / ".local" / "secrets" / f"rabbitmq-{prefix}{role}").unlink()


@pytest.fixture
async def database(services: Services, mongo_db: str) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(services.mongo_url)
    yield client[mongo_db]
    await client.close()


async def test_the_query_user_can_do_everything_the_query_service_does(
    query_user: str, broker: str, services: Services, database: AsyncDatabase[Document]
) -> None:
    settings = QueryServiceSettings(
        amqp_url=query_user,
        mongo_url=services.mongo_url,
        mongo_db=database.name,
        projector_partitions=2,
        projector_rebalance_seconds=0.2,
    )
    projector = await start_projector(
        settings, database, gap_policy=GapPolicy(attempts=1, delay_seconds=0)
    )
    admin = await aio_pika.connect_robust(broker)  # the relay's side
    connection = await aio_pika.connect_robust(query_user)
    try:
        exchange = await (await admin.channel()).get_exchange(EVENTS_EXCHANGE)
        account = uuid.uuid4()
        published = opened_account(account, deposit=10)
        for event in published:
            await publish(exchange, event)
        early = envelope(account, 4, MoneyDeposited(amount=1))
        await publish(exchange, early)  # parked: version 3 is missing
        parked = await eventually(lambda: list_parked(connection), lambda found: len(found) == 1)
        missing = envelope(account, 3, MoneyDeposited(amount=1))
        await publish(exchange, missing)
        assert (await replay_parked(connection)).moved == 1
        published += [missing, early]

        app = create_app(settings, database=database)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as api,
        ):

            async def version() -> int:
                response = await api.get(f"/accounts/{account}")
                return int(response.json().get("version", 0))

            await eventually(version, lambda found: found == 4)
            ready = await api.get("/readyz")

        async with FakeReplayServer(broker, published):
            result = await Rebuild(
                ledger_catalog(database),
                AmqpReplaySource(connection),
                ["accounts"],
                policy=RebuildPolicy(retire_seconds=0),
            ).run()
    finally:
        await connection.close()
        await admin.close()
        await projector.stop(grace_seconds=2)

    assert parked[0].message_id == str(early.event_id)
    assert ready.status_code == 200, ready.text
    assert result.switched == ["accounts"]
