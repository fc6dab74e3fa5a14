"""Both services as real processes (`python -m ...`) against the real servers."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import httpx
import pytest

from shared import topology
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount, WithdrawMoney
from tests.e2e.conftest import Pair, stop
from tests.metrics_support import Samples, scrape, value
from tests.query_support import eventually

pytestmark = pytest.mark.e2e


async def read_account(http: httpx.AsyncClient, url: str, version: int) -> dict[str, object]:
    """Poll the read model until it reaches `version`."""
    async with asyncio.timeout(20):
        while True:
            response = await http.get(url)
            if response.status_code == 200 and response.json()["version"] >= version:
                return dict(response.json())
            await asyncio.sleep(0.1)


async def test_commands_become_visible_in_the_read_model(pair: Pair) -> None:
    account = uuid.uuid4()
    async with await CommandClient.connect(pair.amqp_url) as client, httpx.AsyncClient() as http:
        url = f"{pair.api}/accounts/{account}"
        assert (await http.get(url)).status_code == 404

        opened = await client.send_command(
            OpenAccount(owner_id="alice", currency="EUR", initial_deposit=1000), account
        )
        deposited = await client.send_command(DepositMoney(amount=250), account)
        refused = await client.send_command(WithdrawMoney(amount=5000), account)
        assert (opened.status, deposited.status, refused.status) == (
            "accepted",
            "accepted",
            "rejected",
        )

        # A malformed command is dead-lettered; the service keeps serving.
        connection = await aio_pika.connect(pair.amqp_url)
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"not json"), routing_key="account.OpenAccount")
        await connection.close()
        withdrawn = await client.send_command(WithdrawMoney(amount=50), account)
        assert withdrawn.status == "accepted" and withdrawn.version == 4

        document = await read_account(http, url, 4)
    assert document["id"] == str(account)
    assert document["owner_id"] == "alice"
    assert document["currency"] == "EUR"
    assert document["balance"] == 1200
    assert document["status"] == "open"
    assert document["version"] == 4

    # Both processes' /metrics counted that work (the projector's counters come from its own
    # process, counted once the event's batch is through: a moment after the read model shows it).
    async with httpx.AsyncClient() as http:
        commands = await scrape(http, f"{pair.command_http}/metrics")

        async def projector_metrics() -> Samples:
            return await scrape(http, f"{pair.api}/metrics")

        projected = await eventually(
            projector_metrics,
            lambda found: (
                value(found, "cqrs_events_projected_total", event_type="MoneyWithdrawn") >= 1
            ),
        )
        ready = await http.get(f"{pair.command_http}/readyz")
    counted = "cqrs_commands_total"
    assert value(commands, counted, type="OpenAccount", outcome="accepted") == 1
    assert value(commands, counted, type="WithdrawMoney", outcome="accepted") == 1
    assert value(commands, counted, type="WithdrawMoney", outcome="rejected") == 1
    assert value(commands, counted, type="unknown", outcome="dead_lettered") == 1
    assert value(commands, "cqrs_events_published_total") >= 4
    assert value(projected, "cqrs_events_projected_total", event_type="MoneyWithdrawn") == 1
    assert ready.status_code == 200

    assert dict(stop(pair)) == {"command_service": 0, "query_service": 0}
