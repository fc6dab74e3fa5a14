"""The PostgreSQL event store: optimistic concurrency, idempotency, commit-ordered positions."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from command_service.adapters.event_store import (
    ConcurrencyError,
    DuplicateCommandError,
    NewEvent,
    PostgresEventStore,
    read_all,
)
from command_service.adapters.migrations import available_migrations, migrate
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
