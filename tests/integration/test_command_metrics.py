"""The command service's HTTP endpoint against real RabbitMQ and PostgreSQL: /metrics moves with
real commands, /status tells the relay's progress and the partitions held, /readyz follows the
database."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest
from structlog.testing import capture_logs

from command_service.bootstrap import CommandService, start
from command_service.settings import CommandServiceSettings
from shared import topology
from shared.client import CommandClient, envelope_for
from shared.ledger import ACCOUNT, DepositMoney, OpenAccount, WithdrawMoney
from shared.messages import CommandEnvelope
from tests.metrics_support import Samples, labelled, scrape, value
from tests.query_support import eventually
from tests.reason_support import driver_details
from tests.tcp_proxy import TcpProxy, through

pytestmark = pytest.mark.integration


def endpoint(service: CommandService) -> str:
    assert service.http is not None
    return f"http://127.0.0.1:{service.http.port}"


@pytest.fixture
async def http(command_service: CommandService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=endpoint(command_service), timeout=5) as client:
        yield client


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_count_commands_by_type_and_outcome(
    http: httpx.AsyncClient, client: CommandClient, broker: str
) -> None:
    before = await scrape(http)
    account = uuid.uuid4()
    opening = envelope_for(OpenAccount(owner_id="o", currency="EUR", initial_deposit=10), account)

    assert (await client.send(opening, ACCOUNT)).status == "accepted"
    assert (await client.send(opening, ACCOUNT)).status == "duplicate"
    refused = await client.send_command(WithdrawMoney(amount=999), account)
    assert refused.status == "rejected"
    unknown = CommandEnvelope.model_validate(
        {**opening.model_dump(), "command_id": uuid.uuid4(), "type": "HackTheLedger"}
    )
    assert (await client.send(unknown, ACCOUNT)).status == "rejected"  # dead-lettered
    connection = await aio_pika.connect(broker)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"not json"), routing_key="account.OpenAccount")

    def settled(samples: Samples) -> bool:
        dead = moved(
            before, samples, "cqrs_commands_total", type="unknown", outcome="dead_lettered"
        )
        published = moved(before, samples, "cqrs_events_published_total")
        return dead == 2 and published == 2 and value(samples, "cqrs_relay_backlog_events") == 0

    after = await eventually(lambda: scrape(http), settled)

    commands = "cqrs_commands_total"
    assert moved(before, after, commands, type="OpenAccount", outcome="accepted") == 1
    assert moved(before, after, commands, type="OpenAccount", outcome="duplicate") == 1
    assert moved(before, after, commands, type="WithdrawMoney", outcome="rejected") == 1
    assert moved(before, after, commands, type="WithdrawMoney", outcome="accepted") == 0
    # What a client puts in `type` never becomes a label.
    assert not any(labels["type"] == "HackTheLedger" for labels in labelled(after, commands))
    handling = "cqrs_command_handling_seconds_count"
    assert moved(before, after, handling, type="OpenAccount") == 2
    assert moved(before, after, handling, type="unknown") == 2
    assert moved(before, after, "cqrs_event_append_seconds_count") == 1
    assert moved(before, after, "cqrs_relay_publish_seconds_count") >= 1
    assert value(after, "cqrs_partitions_owned") == 2


async def test_status_tells_partitions_membership_and_relay_progress(
    http: httpx.AsyncClient, client: CommandClient
) -> None:
    account = uuid.uuid4()
    await client.send_command(OpenAccount(owner_id="o", currency="EUR"), account)
    last = await client.send_command(DepositMoney(amount=5), account)
    assert last.status == "accepted" and last.position is not None

    async def status() -> dict[str, Any]:
        response = await http.get("/status")
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    body = await eventually(
        status,
        lambda body: (
            body["members"] == 1
            and body["relay"]["backlog"] == 0
            and body["relay"]["head_position"] == last.position
        ),
    )

    assert body["service"] == "command"
    assert body["replica"] == f"{socket.gethostname()}-{os.getpid()}"
    assert body["partitions_owned"] == [0, 1]  # all of them: the only replica
    assert body["relay"]["published_position"] == last.position
    assert body["relay"]["leading"] is True
    assert body["handled"] >= 2
    assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_readiness_follows_the_database(
    command_settings: CommandServiceSettings, postgres_proxy: TcpProxy
) -> None:
    settings = command_settings.model_copy(
        update={"postgres_dsn": through(postgres_proxy, command_settings.postgres_dsn)}
    )
    service = await start(settings)
    try:
        async with httpx.AsyncClient(base_url=endpoint(service), timeout=10) as http:

            async def readiness() -> tuple[int, dict[str, Any]]:
                response = await http.get("/readyz")
                return response.status_code, response.json()

            _, body = await eventually(readiness, lambda reading: reading[0] == 200)
            assert body["status"] == "ready"
            assert {name for name, check in body["checks"].items() if check["ok"]} == {
                "postgres",
                "broker",
                "partitions",
                "tasks",
            }

            await postgres_proxy.cut()
            with capture_logs() as logs:
                _, body = await eventually(readiness, lambda reading: reading[0] == 503)
                status = await http.get("/status")
            assert body["status"] == "not_ready"
            # A reason code for the caller, the driver's exception for the log.
            assert body["checks"]["postgres"] == {"ok": False, "reason": "unreachable"}
            assert body["checks"]["broker"]["ok"] is True
            assert status.status_code == 200
            assert status.json()["relay"]["reason"] == "unreachable"
            address = f"127.0.0.1:{postgres_proxy.port}"
            assert driver_details(json.dumps(body), address) == []
            assert driver_details(status.text, address) == []
            failed = [e for e in logs if e["event"] == "readiness_check_failed"]
            assert failed and {(e["log_level"], e["check"]) for e in failed} == {
                ("warning", "postgres")
            }
            assert all("Error" in e["error"] for e in failed)
            assert any(e["event"] == "relay_status_unknown" for e in logs)
            _, body = await eventually(
                readiness, lambda reading: reading[1]["checks"]["partitions"]["ok"] is False
            )
            assert (await http.get("/healthz")).status_code == 200  # alive all the same
            scraped = await scrape(http)  # still answers, the backlog unknown rather than 0
            assert math.isnan(value(scraped, "cqrs_relay_backlog_events"))

            await postgres_proxy.restore()
            _, body = await eventually(readiness, lambda reading: reading[0] == 200)
            assert body["checks"]["partitions"]["owned"] == [0, 1]
    finally:
        await service.stop()


async def test_services_in_one_process_each_serve_their_own_metrics(
    command_settings: CommandServiceSettings, command_service: CommandService
) -> None:
    other = await start(command_settings)
    try:
        assert other.http is not None and command_service.http is not None
        assert other.http.port != command_service.http.port
        async with httpx.AsyncClient(timeout=5) as http:
            for service in (command_service, other):
                samples = await scrape(http, f"{endpoint(service)}/metrics")
                assert ("cqrs_partitions_owned", ()) in samples
    finally:
        await other.stop()


async def test_a_connection_without_a_request_head_is_closed_after_the_header_timeout(
    command_settings: CommandServiceSettings,
) -> None:
    service = await start(command_settings.model_copy(update={"http_header_timeout_seconds": 1}))
    try:
        assert service.http is not None
        opened = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", service.http.port)
        try:
            while await asyncio.wait_for(reader.read(65536), 10):
                pass
            closed_after = time.monotonic() - opened
        finally:
            writer.close()
        async with httpx.AsyncClient(base_url=endpoint(service), timeout=5) as http:
            health = await http.get("/healthz")
    finally:
        await service.stop()

    assert 0.9 <= closed_after < 3, closed_after
    assert health.status_code == 200
