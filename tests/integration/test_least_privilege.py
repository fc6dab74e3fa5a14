"""The command service's PostgreSQL role can append and read, never rewrite history or schema."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from command_service.bootstrap import start
from command_service.settings import CommandServiceSettings
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount, RequestTransfer

pytestmark = pytest.mark.integration


@pytest.fixture
async def service_dsn(pool: asyncpg.Pool, pg_dsn: str) -> AsyncIterator[str]:
    """A login role that is a member of cqrs_service, on the migrated test database."""
    role = f"cqrs_cmd_{uuid.uuid4().hex[:8]}"
    await pool.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE cqrs_service')
    parts = urlsplit(pg_dsn)
    yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
    await pool.execute(f'DROP ROLE "{role}"')


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE events",
        "DELETE FROM events",
        "UPDATE events SET data = '{}'",
        "TRUNCATE commands",
        "DELETE FROM commands",
        "UPDATE commands SET client_only = false",
        "DELETE FROM internal_commands",
        "UPDATE streams SET aggregate_type = 'transfer'",
        "DELETE FROM streams",
        "ALTER TABLE events ADD COLUMN x int",
        "CREATE TABLE intruder (id int)",
    ],
)
async def test_the_service_role_cannot_rewrite_history_or_schema(
    service_dsn: str, statement: str
) -> None:
    connection = await asyncpg.connect(service_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(statement)
    finally:
        await connection.close()


async def test_the_service_runs_with_that_role_and_migrates_as_the_owner(
    command_settings: CommandServiceSettings, service_dsn: str, pg_dsn: str
) -> None:
    settings = command_settings.model_copy(
        update={
            "postgres_dsn": service_dsn,
            "postgres_migration_dsn": pg_dsn,
            "snapshot_every": 2,
        }
    )
    service = await start(settings)
    try:
        async with await CommandClient.connect(settings.amqp_url) as client:
            account = uuid.uuid4()
            opened = await client.send_command(
                OpenAccount(owner_id="o", currency="EUR", initial_deposit=1), account
            )
            deposited = await client.send_command(DepositMoney(amount=2), account)
            other, transfer = uuid.uuid4(), uuid.uuid4()
            await client.send_command(OpenAccount(owner_id="o", currency="EUR"), other)
            # A transfer: the process manager's steps write the internal command log.
            requested = await client.send_command(
                RequestTransfer(from_account_id=account, to_account_id=other, amount=3), transfer
            )
        assert (opened.status, deposited.status, requested.status) == ("accepted",) * 3
        connection = await asyncpg.connect(pg_dsn)
        try:
            async with asyncio.timeout(15):
                while not await connection.fetchval(
                    "SELECT count(*) FROM events WHERE stream_id = $1 AND type = $2",
                    transfer,
                    "TransferCompleted",
                ):
                    await asyncio.sleep(0.05)
            assert await connection.fetchval(
                "SELECT count(*) FROM snapshots WHERE stream_id = $1", account
            )
            assert await connection.fetchval("SELECT count(*) FROM internal_commands") == 4
        finally:
            await connection.close()
    finally:
        await service.stop()
