"""`python -m query_service` as a process: events in over AMQP, account out over HTTP, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import aio_pika
import httpx
import pytest

from shared.ledger import MoneyWithdrawn
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Services
from tests.query_support import envelope, eventually, opened_account, publish

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunningService:
    process: asyncio.subprocess.Process
    http_url: str
    amqp_url: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def service(broker: str, services: Services, mongo_db: str) -> AsyncIterator[RunningService]:
    port = _free_port()
    env = {
        **os.environ,
        "CQRS_AMQP_URL": broker,
        "CQRS_MONGO_URL": services.mongo_url,
        "CQRS_MONGO_DB": mongo_db,
        "CQRS_HTTP_HOST": "127.0.0.1",
        "CQRS_HTTP_PORT": str(port),
        "CQRS_PROJECTOR_PARTITIONS": "2",
        "CQRS_LOG_JSON": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "query_service", cwd=REPO, env=env
    )
    try:
        yield RunningService(process, f"http://127.0.0.1:{port}", broker)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_projects_serves_and_exits_cleanly_on_sigterm(
    service: RunningService,
) -> None:
    account_id = uuid4()
    async with httpx.AsyncClient(base_url=service.http_url, timeout=2) as http:

        async def health() -> int:
            try:
                return (await http.get("/healthz")).status_code
            except httpx.TransportError:
                return 0

        await eventually(health, lambda status: status == 200)

        connection = await aio_pika.connect(service.amqp_url)
        async with connection:
            channel = await connection.channel()
            events = await channel.get_exchange(EVENTS_EXCHANGE)
            for event in [
                *opened_account(account_id, owner_id="erin", currency="SEK", deposit=500),
                envelope(account_id, 3, MoneyWithdrawn(amount=120)),
            ]:
                await publish(events, event)

        async def shown() -> dict[str, object]:
            response = await http.get(f"/accounts/{account_id}")
            return dict(response.json()) if response.status_code == 200 else {}

        account = await eventually(shown, lambda body: body.get("version") == 3)

    assert (account["owner_id"], account["currency"], account["balance"]) == ("erin", "SEK", 380)
    service.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service.process.wait(), timeout=20) == 0
