"""Versioned schema migrations, applied at start-up under an advisory lock.

Each file `migrations/NNNN_name.sql` runs once, in its own transaction, in number order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
import structlog

from command_service.adapters.postgres_event_store import Connection, translate_driver_errors

log = structlog.get_logger(__name__)

# Serialises replicas that start together; any constant unique to this purpose will do.
MIGRATION_LOCK_KEY = 0x637172735F6D6967  # "cqrs_mig"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    folder = resources.files("command_service.adapters") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def _log_warning(connection: Connection, message: asyncpg.PostgresLogMessage, /) -> None:
    # What a migration says about the data it found (RAISE WARNING) is for the operator's eyes;
    # plain notices ("already exists, skipping") are not.
    if getattr(message, "severity_en", None) == "WARNING":
        log.warning("migration_warning", message=message.message)


async def migrate(connection: Connection) -> list[int]:
    """Apply the migrations this database lacks; return the versions applied."""
    applied_now: list[int] = []
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    connection.add_log_listener(_log_warning)
    try:
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration.version)
            log.info("migration_applied", version=migration.version, name=migration.name)
    finally:
        connection.remove_log_listener(_log_warning)
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def migrate_schema(dsn: str) -> list[int]:
    """Connect as `dsn` (the schema owner), migrate, disconnect."""
    async with translate_driver_errors():
        connection = await asyncpg.connect(dsn)
    try:
        return await migrate(connection)
    finally:
        await connection.close()
