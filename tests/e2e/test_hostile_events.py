"""The relay never stops on one event: stored content cannot make a publish fail.

An event is written straight into the events table with metadata today's edge refuses but an
older version could have stored: a correlation id of 100 x '€' (300 bytes, more than any AMQP
property holds), a causation id of 5,000 characters, a malformed trace context, a key of its
own. Through both services as processes, it must be published and projected, and the events
after it too.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import httpx
import pytest

from command_service.adapters.postgres_event_store import EVENTS_CHANNEL, init_connection
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount
from tests.e2e.conftest import Pair

pytestmark = pytest.mark.e2e

HOSTILE_METADATA = {
    "correlation_id": "€" * 100,
    "causation_id": "c" * 5_000,
    "traceparent": "not-a-trace-context" * 10,
    "from_an_older_version": {"nested": ["\u202e", "🙂"]},
}


async def append_raw(dsn: str, account: uuid.UUID) -> None:
    """Append an account opening the way an older version could have, bypassing the store."""
    connection = await asyncpg.connect(dsn)
    try:
        await init_connection(connection)
        async with connection.transaction():
            position = await connection.fetchval(
                "UPDATE event_position SET last = last + 1 RETURNING last"
            )
            await connection.execute(
                """INSERT INTO events (position, event_id, stream_id, aggregate_type, version,
                                       type, schema_version, data, metadata)
                   VALUES ($1, $2, $3, 'account', 1, 'AccountOpened', 1, $4, $5)""",
                position,
                uuid.uuid4(),
                account,
                {"owner_id": "mallory", "currency": "EUR"},
                HOSTILE_METADATA,
            )
            await connection.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(position))
    finally:
        await connection.close()


async def test_an_event_with_hostile_stored_metadata_is_published_and_projected(
    pair: Pair, pg_dsn: str
) -> None:
    account = uuid.uuid4()
    await append_raw(pg_dsn, account)
    async with await CommandClient.connect(pair.amqp_url) as client, httpx.AsyncClient() as http:
        # A command on the same account after it: its events queue behind the hostile one.
        deposit = await client.send_command(DepositMoney(amount=40), account)
        assert (deposit.status, deposit.version) == ("accepted", 2)
        other = uuid.uuid4()
        opened = await client.send_command(OpenAccount(owner_id="o", currency="EUR"), other)
        assert opened.status == "accepted"

        async with asyncio.timeout(30):
            while True:
                response = await http.get(f"{pair.api}/accounts/{account}")
                later = await http.get(f"{pair.api}/accounts/{other}")
                if (
                    response.status_code == 200
                    and response.json()["version"] == 2
                    and later.status_code == 200
                ):
                    break
                await asyncio.sleep(0.1)
        document = response.json()
        assert (document["owner_id"], document["balance"]) == ("mallory", 40)
        status = (await http.get(f"{pair.command_http}/status")).json()
        assert status["relay"]["backlog"] == 0
        ready = await http.get(f"{pair.command_http}/readyz")
        assert ready.status_code == 200, json.dumps(ready.json())
