"""The event store (`service_layer.event_store.EventStore`) on PostgreSQL.

Events, the command record (with its reply, for idempotency) and the outbox commit in one
transaction: the `events` table is the outbox, read by the relay in position order.

Commands from clients and the commands process managers issue are recorded in two key spaces
(`commands`, `internal_commands`): a step's id is computable from the source, and no client
command may occupy it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from command_service.service_layer.event_store import (
    Appending,
    BatchWrite,
    ConcurrencyError,
    DuplicateCommandError,
    EventStoreUnavailableError,
    NewEvent,
    Snapshot,
    StoredEvent,
    WrongAggregateTypeError,
)
from shared.messages import Reply

# A connection of its own or one lent by the pool.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# pg_notify channel the relay listens on; the notification is delivered at commit.
EVENTS_CHANNEL = "cqrs_events"


class Timer(Protocol):
    """Where a duration is recorded (a Prometheus histogram fits)."""

    def observe(self, amount: float) -> None: ...


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.TransactionRollbackError,
)


@asynccontextmanager
async def translate_driver_errors() -> AsyncIterator[None]:
    """Turn the driver's connection failures into `EventStoreUnavailableError`."""
    try:
        yield
    except TRANSIENT_ERRORS as e:
        raise EventStoreUnavailableError(str(e) or type(e).__name__) from e


async def init_connection(connection: Connection) -> None:
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


async def _keep_session(connection: Connection) -> None:
    """Pool release without the default reset round trip: these sessions never LISTEN, take
    session locks or SET anything (asyncpg still ends an open transaction)."""


async def create_pool(dsn: str, size: int, *, stall_timeout: float = 15.0) -> asyncpg.Pool:
    """The service's pool. A session whose client went silent inside a transaction (a network
    cut, a frozen replica) would hold the position counter's row lock, and so every append of
    every replica, until the kernel's keepalive gives up (hours): the server ends such a session
    after `stall_timeout` seconds idle in a transaction, or of unacknowledged data."""
    millis = str(max(int(stall_timeout * 1000), 1000))
    async with translate_driver_errors():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            init=init_connection,
            reset=_keep_session,
            command_timeout=30,
            server_settings={
                "idle_in_transaction_session_timeout": millis,
                "tcp_user_timeout": millis,
                "statement_timeout": "30000",
            },
        )
    assert pool is not None
    return pool


_COLUMNS = (
    "position, event_id, stream_id, aggregate_type, version, type, schema_version, "
    "data, metadata, recorded_at"
)


async def _recorded_type(connection: Connection, stream_id: UUID) -> str | None:
    """The aggregate type a stream was recorded with (None: no such stream)."""
    found = await connection.fetchval(
        "SELECT aggregate_type FROM streams WHERE stream_id = $1", stream_id
    )
    return None if found is None else str(found)


@dataclass(frozen=True)
class _CommandLog:
    """The statements of one key space of the command log."""

    find: str
    record: str
    reject: str
    key: str  # the constraint a second record of one command id violates
    find_many: str  # (command_id, reply) of the ids recorded, the key space's own first
    record_many: str  # records each one not recorded yet; returns the ids it recorded


_CLIENT_LOG = _CommandLog(
    find="SELECT reply FROM commands WHERE command_id = $1",
    record="""INSERT INTO commands (command_id, aggregate_id, reply, client_only)
              VALUES ($1, $2, $3, true)""",
    reject="""WITH inserted AS (
                  INSERT INTO commands (command_id, aggregate_id, reply, client_only)
                  VALUES ($1, $2, $3, true) ON CONFLICT (command_id) DO NOTHING RETURNING reply)
              SELECT reply FROM inserted
              UNION ALL SELECT reply FROM commands WHERE command_id = $1
              LIMIT 1""",
    key="commands_pkey",
    find_many="SELECT command_id, reply FROM commands WHERE command_id = ANY($1::uuid[])",
    record_many="""INSERT INTO commands (command_id, aggregate_id, reply, client_only)
                   SELECT command_id, aggregate_id, reply::jsonb, true
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[])
                        AS given(command_id, aggregate_id, reply)
                   ON CONFLICT (command_id) DO NOTHING RETURNING command_id""",
)
_INTERNAL_LOG = _CommandLog(
    # A record not marked client_only was written before the key spaces existed (or by an
    # older replica during a rolling update) and may be a step's: it answers steps too.
    find="""SELECT reply FROM internal_commands WHERE command_id = $1
            UNION ALL
            SELECT reply FROM commands WHERE command_id = $1 AND NOT client_only
            LIMIT 1""",
    record="""INSERT INTO internal_commands (command_id, aggregate_id, reply)
              VALUES ($1, $2, $3)""",
    reject="""WITH inserted AS (
                  INSERT INTO internal_commands (command_id, aggregate_id, reply)
                  VALUES ($1, $2, $3) ON CONFLICT (command_id) DO NOTHING RETURNING reply)
              SELECT reply FROM inserted
              UNION ALL SELECT reply FROM internal_commands WHERE command_id = $1
              LIMIT 1""",
    key="internal_commands_pkey",
    find_many="""SELECT command_id, reply FROM (
                     SELECT command_id, reply, 0 AS rank FROM internal_commands
                     WHERE command_id = ANY($1::uuid[])
                     UNION ALL
                     SELECT command_id, reply, 1 AS rank FROM commands
                     WHERE command_id = ANY($1::uuid[]) AND NOT client_only) AS found
                 ORDER BY rank""",
    record_many="""INSERT INTO internal_commands (command_id, aggregate_id, reply)
                   SELECT command_id, aggregate_id, reply::jsonb
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[])
                        AS given(command_id, aggregate_id, reply)
                   ON CONFLICT (command_id) DO NOTHING RETURNING command_id""",
)


def _command_log(internal: bool) -> _CommandLog:
    return _INTERNAL_LOG if internal else _CLIENT_LOG


def _stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(**dict(row.items()))


class PostgresEventStore:
    """`EventStore` on PostgreSQL through an asyncpg pool; `append_seconds` times each append
    transaction."""

    def __init__(self, pool: asyncpg.Pool, *, append_seconds: Timer | None = None) -> None:
        self._pool = pool
        self._append_seconds = append_seconds

    async def load_stream(self, stream_id: UUID, after_version: int = 0) -> list[StoredEvent]:
        async with translate_driver_errors():
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2
                    ORDER BY version""",
                stream_id,
                after_version,
            )
        return [_stored(row) for row in rows]

    async def load_snapshot(self, stream_id: UUID) -> Snapshot | None:
        async with translate_driver_errors():
            row = await self._pool.fetchrow(
                """SELECT stream_id, aggregate_type, version, schema_version, state
                   FROM snapshots WHERE stream_id = $1""",
                stream_id,
            )
        return None if row is None else Snapshot(**dict(row.items()))

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        async with translate_driver_errors():
            await self._pool.execute(
                """INSERT INTO snapshots (stream_id, aggregate_type, version, schema_version, state)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (stream_id) DO UPDATE
                   SET version = excluded.version, schema_version = excluded.schema_version,
                       state = excluded.state, recorded_at = now()
                   WHERE snapshots.version < excluded.version""",
                snapshot.stream_id,
                snapshot.aggregate_type,
                snapshot.version,
                snapshot.schema_version,
                snapshot.state,
            )

    async def find_reply(self, command_id: UUID, *, internal: bool = False) -> Reply | None:
        async with translate_driver_errors():
            stored = await self._pool.fetchval(_command_log(internal).find, command_id)
        return None if stored is None else Reply.model_validate(stored)

    async def append(
        self,
        *,
        stream_id: UUID,
        aggregate_type: str,
        expected_version: int,
        events: Sequence[NewEvent],
        command_id: UUID,
        correlation_id: str | None,
        user: str | None = None,
        traceparent: str | None = None,
        internal: bool = False,
    ) -> Reply:
        command_log = _command_log(internal)
        # Who did what: the sender as the broker verified it, not as the envelope claims.
        metadata = {
            "correlation_id": correlation_id,
            "causation_id": str(command_id),
            "user": user,
        }
        if traceparent is not None:  # events stored without tracing stay as they were
            metadata["traceparent"] = traceparent
        async with translate_driver_errors(), self._pool.acquire() as connection:
            try:
                started = time.perf_counter()
                try:
                    async with connection.transaction():
                        return await self._append(
                            connection,
                            stream_id,
                            aggregate_type,
                            expected_version,
                            events,
                            command_id,
                            metadata,
                            command_log,
                        )
                finally:
                    if self._append_seconds is not None:
                        self._append_seconds.observe(time.perf_counter() - started)
            except asyncpg.UniqueViolationError as e:
                if e.constraint_name == command_log.key:
                    reply = await self.find_reply(command_id, internal=internal)
                    assert reply is not None  # the conflicting row committed
                    raise DuplicateCommandError(reply) from e
                if e.constraint_name == "streams_pkey":
                    # Another first append of this stream committed while this one waited.
                    recorded = await _recorded_type(connection, stream_id)
                    if recorded != aggregate_type:
                        raise WrongAggregateTypeError(stream_id, aggregate_type, recorded) from e
                raise ConcurrencyError(
                    f"stream {stream_id} moved past version {expected_version}"
                ) from e
            except asyncpg.ForeignKeyViolationError as e:
                if e.constraint_name != "events_stream_type_fkey":
                    raise
                recorded = await _recorded_type(connection, stream_id)
                raise WrongAggregateTypeError(stream_id, aggregate_type, recorded) from e

    @staticmethod
    async def _append(
        connection: Connection,
        stream_id: UUID,
        aggregate_type: str,
        expected_version: int,
        events: Sequence[NewEvent],
        command_id: UUID,
        metadata: dict[str, Any],
        command_log: _CommandLog,
    ) -> Reply:
        # Fail fast, before taking the position lock, when the stream already moved on.
        current = await connection.fetchval(
            "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", stream_id
        )
        if current != expected_version:
            raise ConcurrencyError(
                f"stream {stream_id} is at version {current}, not {expected_version}"
            )
        # The row lock on event_position is held until commit: positions follow commit order.
        # A stream's first event records the stream's type (a trigger, migration 0004); the
        # events' foreign key on (stream_id, aggregate_type) refuses any other type.
        last = await connection.fetchval(
            "UPDATE event_position SET last = last + $1 RETURNING last", len(events)
        )
        first = last - len(events) + 1
        await connection.executemany(
            """INSERT INTO events (position, event_id, stream_id, aggregate_type, version,
                                   type, schema_version, data, metadata)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            [
                (
                    first + i,
                    event.event_id,
                    stream_id,
                    aggregate_type,
                    expected_version + 1 + i,
                    event.type,
                    event.schema_version,
                    event.data,
                    metadata,
                )
                for i, event in enumerate(events)
            ],
        )
        reply = Reply(
            command_id=command_id,
            status="accepted",
            aggregate_id=stream_id,
            version=expected_version + len(events),
            position=last,
        )
        await connection.execute(
            command_log.record,
            command_id,
            stream_id,
            reply.model_dump(mode="json"),
        )
        await connection.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(last))
        return reply

    async def find_replies(
        self, command_ids: Sequence[UUID], *, internal: bool = False
    ) -> dict[UUID, Reply]:
        async with translate_driver_errors():
            rows = await self._pool.fetch(_command_log(internal).find_many, list(command_ids))
        found: dict[UUID, Reply] = {}
        for row in rows:
            if row["command_id"] not in found:
                found[row["command_id"]] = Reply.model_validate(row["reply"])
        return found

    async def load_snapshots(self, stream_ids: Sequence[UUID]) -> dict[UUID, Snapshot]:
        async with translate_driver_errors():
            rows = await self._pool.fetch(
                """SELECT stream_id, aggregate_type, version, schema_version, state
                   FROM snapshots WHERE stream_id = ANY($1::uuid[])""",
                list(stream_ids),
            )
        return {row["stream_id"]: Snapshot(**dict(row.items())) for row in rows}

    async def load_streams(
        self, after_versions: Mapping[UUID, int]
    ) -> dict[UUID, list[StoredEvent]]:
        async with translate_driver_errors():
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM events
                    JOIN unnest($1::uuid[], $2::integer[]) AS wanted(stream, after_version)
                      ON events.stream_id = wanted.stream AND events.version > wanted.after_version
                    ORDER BY stream_id, version""",
                list(after_versions),
                list(after_versions.values()),
            )
        streams: dict[UUID, list[StoredEvent]] = {stream_id: [] for stream_id in after_versions}
        for row in rows:
            streams[row["stream_id"]].append(_stored(row))
        return streams

    async def append_batch(
        self, writes: Sequence[BatchWrite], *, internal: bool = False
    ) -> list[Reply]:
        command_log = _command_log(internal)
        async with translate_driver_errors(), self._pool.acquire() as connection:
            started = time.perf_counter()
            try:
                async with connection.transaction():
                    return await self._append_batch(connection, writes, command_log)
            except (asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError) as e:
                # Another writer came first (a stream's next version, its first event of
                # another type, a command id): nothing of the batch was stored.
                raise ConcurrencyError(
                    f"another writer came first ({e.constraint_name}); the batch was not stored"
                ) from e
            finally:
                if self._append_seconds is not None:
                    self._append_seconds.observe(time.perf_counter() - started)

    @staticmethod
    async def _append_batch(
        connection: Connection, writes: Sequence[BatchWrite], command_log: _CommandLog
    ) -> list[Reply]:
        appends = [write for write in writes if isinstance(write, Appending)]
        replies: list[Reply] = []
        rows_to_insert: list[tuple[Any, ...]] = []
        last = position = 0
        if appends:
            # Fail fast, before taking the position lock, when a stream already moved on.
            first_expected: dict[UUID, int] = {}
            for append in appends:
                first_expected.setdefault(append.stream_id, append.expected_version)
            rows = await connection.fetch(
                """SELECT stream_id, max(version) AS version FROM events
                   WHERE stream_id = ANY($1::uuid[]) GROUP BY stream_id""",
                list(first_expected),
            )
            current = {row["stream_id"]: row["version"] for row in rows}
            moved = [s for s, v in first_expected.items() if current.get(s, 0) != v]
            if moved:
                raise ConcurrencyError(
                    f"stream {moved[0]} is at version {current.get(moved[0], 0)}, not "
                    f"{first_expected[moved[0]]}"
                )
            total = sum(len(append.events) for append in appends)
            # One update of the position counter for the batch (its row lock held until
            # commit: positions follow commit order), the positions in batch order.
            last = await connection.fetchval(
                "UPDATE event_position SET last = last + $1 RETURNING last", total
            )
            position = last - total
        for write in writes:
            if not isinstance(write, Appending):
                replies.append(write)
                continue
            metadata: dict[str, Any] = {
                "correlation_id": write.correlation_id,
                "causation_id": str(write.command_id),
                "user": write.user,
            }
            if write.traceparent is not None:
                metadata["traceparent"] = write.traceparent
            for i, event in enumerate(write.events):
                position += 1
                rows_to_insert.append(
                    (
                        position,
                        event.event_id,
                        write.stream_id,
                        write.aggregate_type,
                        write.expected_version + 1 + i,
                        event.type,
                        event.schema_version,
                        event.data,
                        metadata,
                    )
                )
            replies.append(
                Reply(
                    command_id=write.command_id,
                    status="accepted",
                    aggregate_id=write.stream_id,
                    version=write.expected_version + len(write.events),
                    position=position,
                )
            )
        if appends:
            await connection.executemany(
                """INSERT INTO events (position, event_id, stream_id, aggregate_type, version,
                                       type, schema_version, data, metadata)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
                rows_to_insert,
            )
        recorded = {
            row["command_id"]
            for row in await connection.fetch(
                command_log.record_many,
                [reply.command_id for reply in replies],
                [reply.aggregate_id for reply in replies],
                [reply.model_dump_json() for reply in replies],
            )
        }
        for append in appends:
            if append.command_id not in recorded:
                raise ConcurrencyError(f"command {append.command_id} was recorded meanwhile")
        if len(recorded) < len(replies):
            # Rejections recorded before (by another writer since the batch looked): each
            # answers with the reply stored first.
            rows = await connection.fetch(
                command_log.find_many,
                [reply.command_id for reply in replies if reply.command_id not in recorded],
            )
            stored: dict[UUID, Reply] = {}
            for row in rows:
                stored.setdefault(row["command_id"], Reply.model_validate(row["reply"]))
            replies = [
                reply if reply.command_id in recorded else stored[reply.command_id]
                for reply in replies
            ]
        if appends:
            await connection.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(last))
        return replies

    async def record_rejection(self, reply: Reply, *, internal: bool = False) -> Reply:
        async with translate_driver_errors():
            stored = await self._pool.fetchval(
                _command_log(internal).reject,
                reply.command_id,
                reply.aggregate_id,
                reply.model_dump(mode="json"),
            )
        return Reply.model_validate(stored)

    async def read_all(self, after: int, limit: int) -> list[StoredEvent]:
        async with translate_driver_errors():
            return await read_all(self._pool, after, limit)


async def read_all(
    connection: Connection | asyncpg.Pool,
    after: int,
    limit: int,
    *,
    up_to: int | None = None,
    aggregate_types: Sequence[str] | None = None,
) -> list[StoredEvent]:
    """Events after a global position (up to `up_to`), in position order = commit order."""
    rows = await connection.fetch(
        f"""SELECT {_COLUMNS} FROM events
            WHERE position > $1 AND ($3::bigint IS NULL OR position <= $3)
              AND ($4::text[] IS NULL OR aggregate_type = ANY($4))
            ORDER BY position LIMIT $2""",
        after,
        limit,
        up_to,
        aggregate_types,
    )
    return [_stored(row) for row in rows]


async def count_range(
    connection: Connection | asyncpg.Pool,
    after: int,
    up_to: int,
    aggregate_types: Sequence[str] | None = None,
) -> int:
    count = await connection.fetchval(
        """SELECT count(*) FROM events WHERE position > $1 AND position <= $2
             AND ($3::text[] IS NULL OR aggregate_type = ANY($3))""",
        after,
        up_to,
        aggregate_types,
    )
    return int(count)


async def last_position(connection: Connection | asyncpg.Pool) -> int:
    """The newest committed position (0 for an empty store)."""
    return int(await connection.fetchval("SELECT last FROM event_position") or 0)
