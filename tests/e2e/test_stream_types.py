"""A stream has one aggregate type (invariant 10), through the real pair of processes: a command
addressed to another aggregate type's id is rejected, appends nothing and changes no read model."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest

from shared.client import CommandClient, envelope_for
from shared.ledger import ACCOUNT, TRANSFER, DepositMoney, OpenAccount, RequestTransfer
from tests.e2e.conftest import Pair
from tests.query_support import eventually

pytestmark = pytest.mark.e2e

# Fields of an account document that a deposit changes.
MOVING = ("balance", "version", "updated_at", "last_position")


async def stream(dsn: str, stream_id: UUID) -> list[tuple[int, str, str]]:
    """(version, aggregate type, event type) of each stored event of one stream."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            """SELECT version, aggregate_type, type FROM events WHERE stream_id = $1
               ORDER BY version""",
            stream_id,
        )
    finally:
        await connection.close()
    return [(row["version"], row["aggregate_type"], row["type"]) for row in rows]


async def completed(http: httpx.AsyncClient, transfer: UUID) -> dict[str, Any]:
    response = await eventually(
        lambda: http.get(f"/transfers/{transfer}"),
        lambda r: r.status_code == 200 and r.json()["status"] == "completed",
    )
    return dict(response.json())


async def test_commands_for_another_aggregate_type_are_rejected_and_change_no_read_model(
    pair: Pair, pg_dsn: str
) -> None:
    victim, other, transfer = uuid4(), uuid4(), uuid4()
    async with (
        await CommandClient.connect(pair.amqp_url) as client,
        httpx.AsyncClient(base_url=pair.api, timeout=10) as http,
    ):
        for account, balance in ((victim, 100), (other, 0)):
            opened = await client.send_command(
                OpenAccount(owner_id="victim", currency="EUR", initial_deposit=balance), account
            )
            assert opened.status == "accepted"
        requested = await client.send_command(
            RequestTransfer(from_account_id=victim, to_account_id=other, amount=10), transfer
        )
        assert requested.status == "accepted"
        transfer_before = await completed(http, transfer)
        victim_events = await stream(pg_dsn, victim)
        transfer_events = await stream(pg_dsn, transfer)
        account_before = (
            await http.get(f"/accounts/{victim}", params={"min_version": len(victim_events)})
        ).json()
        assert account_before["balance"] == 90

        # A transfer under the victim account's id, and an account under the transfer's id.
        hijacks = [
            (
                envelope_for(
                    RequestTransfer(from_account_id=victim, to_account_id=other, amount=10),
                    victim,
                ),
                TRANSFER,
            ),
            (
                envelope_for(
                    OpenAccount(owner_id="mallory", currency="EUR", initial_deposit=5), transfer
                ),
                ACCOUNT,
            ),
        ]
        for envelope, aggregate_type in hijacks:
            reply = await client.send(envelope, aggregate_type)
            assert reply.status == "rejected", reply
            assert reply.error is not None and reply.error.code == "wrong_aggregate_type"
            # Stored like any rejection: a resend gets the same answer as a duplicate.
            again = await client.send(envelope, aggregate_type)
            assert (again.status, again.error) == ("duplicate", reply.error)

        # Sentinels: a deposit on the victim's own stream, and a transfer between new accounts.
        deposited = await client.send_command(DepositMoney(amount=5), victim)
        assert deposited.status == "accepted"
        assert deposited.version == len(victim_events) + 1
        source, target, sentinel = uuid4(), uuid4(), uuid4()
        for account, balance in ((source, 1), (target, 0)):
            await client.send_command(
                OpenAccount(owner_id="sentinel", currency="EUR", initial_deposit=balance), account
            )
        await client.send_command(
            RequestTransfer(from_account_id=source, to_account_id=target, amount=1), sentinel
        )
        await completed(http, sentinel)
        account_after = await http.get(
            f"/accounts/{victim}", params={"min_version": deposited.version}
        )
        transfer_after = await http.get(f"/transfers/{transfer}")
        crossed = [
            (await http.get(f"/transfers/{victim}")).status_code,
            (await http.get(f"/accounts/{transfer}")).status_code,
        ]

    assert account_after.status_code == 200
    after = account_after.json()
    assert (after["balance"], after["version"]) == (95, deposited.version)
    assert {k: v for k, v in after.items() if k not in MOVING} == {
        k: v for k, v in account_before.items() if k not in MOVING
    }
    assert transfer_after.json() == transfer_before
    assert crossed == [404, 404]
    # Nothing was appended to either stream but the sentinel deposit.
    assert await stream(pg_dsn, victim) == [
        *victim_events,
        (len(victim_events) + 1, ACCOUNT, "MoneyDeposited"),
    ]
    assert await stream(pg_dsn, transfer) == transfer_events
    assert {t for _, t, _ in transfer_events} == {TRANSFER}
