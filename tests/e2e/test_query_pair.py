"""The query side through the real pair of processes: read-your-writes with the reply's version,
and a blue-green rebuild answered by the real command service while commands keep coming."""

from __future__ import annotations

import asyncio
import random
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

from command_service.adapters.postgres_event_store import PostgresEventStore, create_pool
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
from tests.conftest import Services
from tests.e2e.conftest import Pair, stop
from tests.query_support import eventually
from tests.read_model_support import differences, reference_snapshot, snapshot

pytestmark = pytest.mark.e2e

ALL = ["accounts", "transactions", "owner_summaries", "transfers"]


async def test_reads_with_the_replys_version_never_see_stale_data(pair: Pair) -> None:
    account, other, transfer = uuid4(), uuid4(), uuid4()
    async with (
        await CommandClient.connect(pair.amqp_url) as client,
        httpx.AsyncClient(base_url=pair.api, timeout=10) as http,
    ):
        opened = await client.send_command(
            OpenAccount(owner_id="reader", currency="EUR", initial_deposit=100), account
        )
        await client.send_command(OpenAccount(owner_id="other", currency="EUR"), other)
        first = await http.get(f"/accounts/{account}", params={"min_version": opened.version})
        assert first.status_code == 200 and first.json()["balance"] == 100

        balance = 100
        for step in range(1, 21):
            command: Command
            if step % 3 == 0:
                command, balance = WithdrawMoney(amount=step), balance - step
            else:
                command, balance = DepositMoney(amount=step), balance + step
            reply = await client.send_command(command, account)
            assert reply.status == "accepted" and reply.version is not None
            # Straight after the reply, before the projector may have seen the event.
            detail, history, summary = await asyncio.gather(
                http.get(f"/accounts/{account}", params={"min_version": reply.version}),
                http.get(
                    f"/accounts/{account}/transactions",
                    params={"min_position": reply.position, "limit": 1},
                ),
                http.get(
                    "/owners/reader/summary",
                    params={"account_id": str(account), "min_version": reply.version},
                ),
            )
            assert detail.status_code == 200, detail.text
            assert (detail.json()["version"], detail.json()["balance"]) == (reply.version, balance)
            newest = history.json()["items"][0]
            assert (newest["version"], newest["balance_after"]) == (reply.version, balance)
            assert summary.json()["totals"] == [
                {"currency": "EUR", "balance": balance, "accounts": 1}
            ]

        requested = await client.send_command(
            RequestTransfer(from_account_id=account, to_account_id=other, amount=10), transfer
        )
        shown = await http.get(f"/transfers/{transfer}", params={"min_version": requested.version})
        assert shown.status_code == 200
        assert shown.json()["status"] in ("pending", "completed")
        assert shown.json()["amount"] == 10
        # A version the account will not reach in time: a clear "not yet", not stale data.
        ahead = await http.get(f"/accounts/{account}", params={"min_version": 10_000})
        assert ahead.status_code == 504 and ahead.json()["current"]["version"] >= reply.version

    assert dict(stop(pair)) == {"command_service": 0, "query_service": 0}


async def stored_events(store: PostgresEventStore) -> list[EventEnvelope]:
    found: list[EventEnvelope] = []
    while batch := await store.read_all(found[-1].position if found else 0, 1_000):
        found.extend(event.to_envelope() for event in batch)
    return found


async def test_a_rebuild_answered_by_the_command_service_ends_equal_to_the_event_store(
    pair: Pair, pg_dsn: str, services: Services, mongo_db: str
) -> None:
    rng = random.Random(3)
    accounts = [uuid4() for _ in range(16)]
    transfers: set[UUID] = set()

    async def traffic(client: CommandClient, steps: int) -> None:
        for _ in range(steps):
            account = rng.choice(accounts)
            roll = rng.random()
            if roll < 0.4:
                await client.send_command(DepositMoney(amount=rng.randint(1, 90)), account)
            elif roll < 0.6:
                await client.send_command(WithdrawMoney(amount=rng.randint(1, 20)), account)
            elif roll < 0.9:
                transfer = uuid4()
                transfers.add(transfer)
                sink = rng.choice([a for a in accounts if a != account])
                await client.send_command(
                    RequestTransfer(from_account_id=account, to_account_id=sink, amount=7),
                    transfer,
                )
            else:
                await client.send_command(FreezeAccount(), account)
                await client.send_command(UnfreezeAccount(), account)

    progress: list[dict[str, Any]] = []
    async with (
        await CommandClient.connect(pair.amqp_url) as client,
        httpx.AsyncClient(base_url=pair.api, timeout=10) as http,
    ):
        for index, account in enumerate(accounts):
            await client.send_command(
                OpenAccount(owner_id=f"o{index % 5}", currency="EUR", initial_deposit=500),
                account,
            )
        await traffic(client, 120)

        started = await http.post("/admin/rebuilds", json={"read_models": ALL})
        assert started.status_code == 202, started.text
        during = asyncio.create_task(traffic(client, 80))

        async def states() -> list[dict[str, Any]]:
            found = (await http.get("/admin/read-models")).json()
            progress.extend(model["rebuild"] for model in found if model["rebuild"])
            return list(found)

        final = await eventually(
            states, lambda found: all(model["current"] == 2 for model in found), timeout=90
        )
        await during
        await traffic(client, 20)  # and after the switch

    pool = await create_pool(pg_dsn, 2)
    try:
        store = PostgresEventStore(pool)

        def finished(events: list[EventEnvelope]) -> bool:
            done = {
                e.aggregate_id for e in events if e.type in ("TransferCompleted", "TransferFailed")
            }
            return transfers <= done

        history = await eventually(lambda: stored_events(store), finished, timeout=60)
    finally:
        await pool.close()
    expected = await reference_snapshot(services.mongo_url, history)
    mongo = create_client(services.mongo_url)
    try:

        async def live() -> list[str]:
            return differences(await snapshot(mongo[mongo_db]), expected)

        assert await eventually(live, lambda found: found == [], timeout=60, interval=0.5) == []
    finally:
        await mongo.close()

    assert all(model["target"] is None for model in final)
    shown = [p for p in progress if p.get("events")]
    assert shown, progress
    assert all(p["done"] <= p["total"] for p in shown if p["total"] is not None)
    assert any(p["events_per_second"] > 0 for p in shown)
    assert dict(stop(pair)) == {"command_service": 0, "query_service": 0}
