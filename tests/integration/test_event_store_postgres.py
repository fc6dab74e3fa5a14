"""The PostgreSQL event store: optimistic concurrency, idempotency, commit-ordered positions."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from structlog.testing import capture_logs

from command_service.adapters import migrations
from command_service.adapters.migrations import available_migrations, migrate
from command_service.adapters.postgres_event_store import (
    PostgresEventStore,
    create_pool,
    init_connection,
    read_all,
)
from command_service.service_layer.event_store import (
    ConcurrencyError,
    DuplicateCommandError,
    NewEvent,
    WrongAggregateTypeError,
)
from shared.ledger import AccountOpened, MoneyDeposited
from shared.messages import Reply, ReplyError

pytestmark = pytest.mark.integration


def deposit(amount: int = 1) -> NewEvent:
    return NewEvent.from_event(MoneyDeposited(amount=amount))


async def append(
    store: PostgresEventStore, stream: uuid.UUID, expected: int, *events: NewEvent
) -> Reply:
    return await store.append(
        stream_id=stream,
        aggregate_type="account",
        expected_version=expected,
        events=events or (deposit(),),
        command_id=uuid.uuid4(),
        correlation_id="c-1",
    )


async def test_migrations_are_applied_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as connection:
        assert await migrate(connection) == []
        versions = await connection.fetch("SELECT version FROM schema_migrations")
    assert [r["version"] for r in versions] == [m.version for m in available_migrations()]


async def test_appended_events_load_back_in_version_order(store: PostgresEventStore) -> None:
    stream = uuid.uuid4()
    opened = NewEvent.from_event(AccountOpened(owner_id="a", currency="EUR"))
    reply = await append(store, stream, 0, opened, deposit(7))
    loaded = await store.load_stream(stream)
    assert [(e.version, e.type, e.data) for e in loaded] == [
        (1, "AccountOpened", {"owner_id": "a", "currency": "EUR"}),
        (2, "MoneyDeposited", {"amount": 7}),
    ]
    assert (reply.version, reply.position) == (2, 2)
    envelope = loaded[1].to_envelope()
    assert envelope.metadata.causation_id == str(reply.command_id)
    assert envelope.metadata.correlation_id == "c-1"


async def test_append_at_a_stale_version_raises_concurrency_error(
    store: PostgresEventStore,
) -> None:
    stream = uuid.uuid4()
    await append(store, stream, 0)
    with pytest.raises(ConcurrencyError):
        await append(store, stream, 0)
    assert len(await store.load_stream(stream)) == 1


async def test_racing_appends_at_one_version_let_exactly_one_win(
    store: PostgresEventStore,
) -> None:
    stream = uuid.uuid4()
    results = await asyncio.gather(
        *(append(store, stream, 0) for _ in range(8)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, Reply)]
    assert len(winners) == 1
    assert all(isinstance(r, ConcurrencyError) for r in results if not isinstance(r, Reply))


async def test_command_id_is_recorded_once(store: PostgresEventStore) -> None:
    stream, command_id = uuid.uuid4(), uuid.uuid4()

    async def append_as(expected: int) -> Reply:
        return await store.append(
            stream_id=stream,
            aggregate_type="account",
            expected_version=expected,
            events=[deposit()],
            command_id=command_id,
            correlation_id=None,
        )

    first = await append_as(0)
    with pytest.raises(DuplicateCommandError) as raised:
        await append_as(1)
    assert raised.value.reply == first
    assert await store.find_reply(command_id) == first
    assert len(await store.load_stream(stream)) == 1


async def test_rejection_is_stored_and_the_first_answer_wins(store: PostgresEventStore) -> None:
    command_id = uuid.uuid4()
    first = Reply(
        command_id=command_id, status="rejected", error=ReplyError(code="a", message="first")
    )
    second = first.model_copy(update={"error": ReplyError(code="b", message="second")})
    assert await store.record_rejection(first) == first
    assert await store.record_rejection(second) == first


async def test_concurrent_appends_get_gap_free_positions_in_commit_order(
    store: PostgresEventStore,
) -> None:
    streams = [uuid.uuid4() for _ in range(10)]

    async def writer(stream: uuid.UUID) -> None:
        for version in range(5):
            await append(store, stream, 2 * version, deposit(), deposit())

    await asyncio.gather(*(writer(s) for s in streams))
    events = await store.read_all(0, 1000)
    assert [e.position for e in events] == list(range(1, 101))
    for stream in streams:
        assert [e.version for e in events if e.stream_id == stream] == list(range(1, 11))


async def test_a_reader_never_sees_a_later_position_before_an_earlier_commits(
    pool: asyncpg.Pool,
) -> None:
    """Invariant 2: a transaction holding position p blocks later ones until it commits."""
    store = PostgresEventStore(pool)
    slow = await pool.acquire()
    try:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute("UPDATE event_position SET last = last + 1")
        # A second writer appends meanwhile; it must wait for the first to commit.
        fast = asyncio.create_task(append(store, uuid.uuid4(), 0))
        await asyncio.sleep(0.3)
        assert not fast.done()
        assert await read_all(pool, 0, 10) == []
        await slow.execute(
            """INSERT INTO events (position, event_id, stream_id, aggregate_type, version, type,
                                   data, metadata)
               VALUES (1, $1, $2, 'account', 1, 'MoneyDeposited', '{"amount": 1}', '{}')""",
            uuid.uuid4(),
            uuid.uuid4(),
        )
        await transaction.commit()
        reply = await fast
    finally:
        await pool.release(slow)
    assert reply.position == 2
    assert [e.position for e in await read_all(pool, 0, 10)] == [1, 2]


async def first_append(store: PostgresEventStore, stream: uuid.UUID, aggregate_type: str) -> Reply:
    return await store.append(
        stream_id=stream,
        aggregate_type=aggregate_type,
        expected_version=0,
        events=[deposit()],
        command_id=uuid.uuid4(),
        correlation_id=None,
    )


async def test_an_append_of_another_type_is_refused_and_appends_nothing(
    store: PostgresEventStore,
) -> None:
    stream, command_id = uuid.uuid4(), uuid.uuid4()
    await append(store, stream, 0)
    with pytest.raises(WrongAggregateTypeError) as raised:
        await store.append(
            stream_id=stream,
            aggregate_type="transfer",
            expected_version=1,
            events=[deposit()],
            command_id=command_id,
            correlation_id=None,
        )
    assert (raised.value.aggregate_type, raised.value.recorded_type) == ("transfer", "account")
    assert [e.aggregate_type for e in await store.load_stream(stream)] == ["account"]
    assert await store.find_reply(command_id) is None


async def test_the_database_refuses_an_event_of_another_type(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    """Even a writer that skips the store's code: the foreign key on (stream_id, type)."""
    stream = uuid.uuid4()
    await append(store, stream, 0)
    insert = """INSERT INTO events (position, event_id, stream_id, aggregate_type, version, type,
                                    data, metadata)
                VALUES (1000, $1, $2, $3, $4, 'TransferRequested', '{}', '{}')"""
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pool.execute(insert, uuid.uuid4(), stream, "transfer", 2)
    # Only a first event records a stream: a later one of a stream never recorded is refused.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pool.execute(insert, uuid.uuid4(), uuid.uuid4(), "transfer", 2)
    # A first event written as the older code wrote it (a replica not yet updated during a
    # rolling update) records its stream by itself.
    fresh = uuid.uuid4()
    await pool.execute(insert, uuid.uuid4(), fresh, "transfer", 1)
    recorded = await pool.fetchval("SELECT aggregate_type FROM streams WHERE stream_id = $1", fresh)
    assert recorded == "transfer"
    assert [e.aggregate_type for e in await store.load_stream(stream)] == ["account"]


async def test_a_first_append_waits_for_a_racing_one_and_is_refused_if_of_another_type(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    stream = uuid.uuid4()
    winner = await pool.acquire()
    try:
        transaction = winner.transaction()
        await transaction.start()
        await winner.execute(
            "INSERT INTO streams (stream_id, aggregate_type) VALUES ($1, 'account')", stream
        )
        loser = asyncio.create_task(first_append(store, stream, "transfer"))
        await asyncio.sleep(0.3)
        assert not loser.done()  # waiting on the stream's key, not deciding on its own
        await transaction.commit()
        with pytest.raises(WrongAggregateTypeError):
            await loser
    finally:
        await pool.release(winner)
    # Of the same type, the loser of the race just lost a race.
    with pytest.raises(ConcurrencyError):
        await first_append(store, stream, "account")


async def test_racing_first_appends_of_two_types_leave_one_type(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    for _ in range(5):
        stream = uuid.uuid4()
        types = ["account", "transfer"] * 4
        results = await asyncio.gather(
            *(first_append(store, stream, t) for t in types), return_exceptions=True
        )
        winners = [t for t, r in zip(types, results, strict=True) if isinstance(r, Reply)]
        assert len(winners) == 1
        for aggregate_type, result in zip(types, results, strict=True):
            if isinstance(result, WrongAggregateTypeError):
                assert aggregate_type != winners[0]
            elif not isinstance(result, Reply):
                assert isinstance(result, ConcurrencyError), result
        assert [e.aggregate_type for e in await store.load_stream(stream)] == winners
        recorded = await pool.fetchval(
            "SELECT aggregate_type FROM streams WHERE stream_id = $1", stream
        )
        assert recorded == winners[0]


@pytest.mark.parametrize("mixed", [False, True])
async def test_existing_streams_take_their_first_events_type(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, mixed: bool
) -> None:
    """Upgrading a store written before stream types: a stream that already holds two types
    (as the old code let happen) keeps its first event's type and does not stop the upgrade."""
    older = [m for m in available_migrations() if m.version < 4]
    monkeypatch.setattr(migrations, "available_migrations", lambda: older)
    connection = await asyncpg.connect(pg_dsn)
    try:
        await migrate(connection)
        account, transfer, hijacked = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        rows = [(account, "account", 1), (account, "account", 2), (transfer, "transfer", 1)]
        rows += [(hijacked, "account", 1), (hijacked, "transfer" if mixed else "account", 2)]
        await connection.executemany(
            """INSERT INTO events (position, event_id, stream_id, aggregate_type, version, type,
                                   data, metadata)
               VALUES ($1, $2, $3, $4, $5, 'Anything', '{}', '{}')""",
            [(i + 1, uuid.uuid4(), *row) for i, row in enumerate(rows)],
        )
        await connection.execute("UPDATE event_position SET last = $1", len(rows))
        monkeypatch.undo()
        with capture_logs() as logs:
            assert await migrate(connection) == [m.version for m in available_migrations()][3:]
        recorded = dict(
            (row["stream_id"], row["aggregate_type"])
            for row in await connection.fetch("SELECT stream_id, aggregate_type FROM streams")
        )
        validated = await connection.fetchval(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'events_stream_type_fkey'"
        )
    finally:
        await connection.close()
    assert recorded == {account: "account", transfer: "transfer", hijacked: "account"}
    # Checked for old rows only when none breaks it; enforced for new ones in both cases.
    assert validated is not mixed
    warnings = [entry for entry in logs if entry["event"] == "migration_warning"]
    assert len(warnings) == (1 if mixed else 0)

    pool = await create_pool(pg_dsn, 2)
    try:
        store = PostgresEventStore(pool)
        with pytest.raises(WrongAggregateTypeError):
            await store.append(
                stream_id=hijacked,
                aggregate_type="transfer",
                expected_version=2,
                events=[deposit()],
                command_id=uuid.uuid4(),
                correlation_id=None,
            )
        reply = await append(store, hijacked, 2)
        assert (reply.version, reply.position) == (3, 6)
    finally:
        await pool.close()


async def test_clients_and_process_managers_have_command_logs_of_their_own(
    store: PostgresEventStore,
) -> None:
    command_id = uuid.uuid4()

    async def append_as(stream: uuid.UUID, *, internal: bool) -> Reply:
        return await store.append(
            stream_id=stream,
            aggregate_type="account",
            expected_version=0,
            events=[deposit()],
            command_id=command_id,
            correlation_id=None,
            internal=internal,
        )

    by_client = await append_as(uuid.uuid4(), internal=False)
    assert await store.find_reply(command_id, internal=True) is None
    by_step = await append_as(uuid.uuid4(), internal=True)
    assert await store.find_reply(command_id) == by_client
    assert await store.find_reply(command_id, internal=True) == by_step
    with pytest.raises(DuplicateCommandError) as raised:
        await append_as(uuid.uuid4(), internal=True)
    assert raised.value.reply == by_step
    rejected_id = uuid.uuid4()
    rejection = Reply(
        command_id=rejected_id, status="rejected", error=ReplyError(code="a", message="client")
    )
    assert await store.record_rejection(rejection) == rejection
    assert await store.find_reply(rejected_id, internal=True) is None


async def test_records_from_before_the_key_spaces_answer_clients_and_steps(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The older code kept one command log; what it recorded may be a step of a transfer in
    flight across the upgrade, or a client's command that its client may resend."""
    older = [m for m in available_migrations() if m.version < 5]
    monkeypatch.setattr(migrations, "available_migrations", lambda: older)
    old = Reply(command_id=uuid.uuid4(), status="accepted", version=1, position=1)
    connection = await asyncpg.connect(pg_dsn)
    try:
        await migrate(connection)
        await init_connection(connection)
        old_statement = "INSERT INTO commands (command_id, aggregate_id, reply) VALUES ($1, $2, $3)"
        await connection.execute(old_statement, old.command_id, None, old.model_dump(mode="json"))
        monkeypatch.undo()
        await migrate(connection)
        # An older replica still running during a rolling update writes the same way.
        during = old.model_copy(update={"command_id": uuid.uuid4()})
        await connection.execute(
            old_statement, during.command_id, None, during.model_dump(mode="json")
        )
    finally:
        await connection.close()
    pool = await create_pool(pg_dsn, 2)
    try:
        store = PostgresEventStore(pool)
        for reply in (old, during):
            assert await store.find_reply(reply.command_id) == reply
            assert await store.find_reply(reply.command_id, internal=True) == reply
    finally:
        await pool.close()
