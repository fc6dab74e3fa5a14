"""The account projection on the real MongoDB server: order, exactly-once, gaps, checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import CHECKPOINTS_COLLECTION, MongoCheckpoints, create_client
from query_service.domains.ledger.accounts import AccountsProjection
from query_service.projections.base import ApplyStatus, InvalidEvent
from query_service.projections.store import Document, VersionedCollection
from query_service.service_layer.projector import GapPolicy, Outcome, Projected, Rejected, project
from shared.ledger import (
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    MoneyDeposited,
    MoneyWithdrawn,
)
from shared.messages import EventEnvelope
from tests.conftest import Services
from tests.query_support import ACCOUNTS, envelope, opened_account

pytestmark = pytest.mark.integration

FAST_GAPS = GapPolicy(attempts=3, delay_seconds=0.02)
APPLIED = Projected(applied=("accounts",), duplicates=())
DUPLICATE = Projected(applied=(), duplicates=("accounts",))


@pytest.fixture
async def database(services: Services, mongo_db: str) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(services.mongo_url)
    yield client[mongo_db]
    await client.close()


async def run(
    event: EventEnvelope, database: AsyncDatabase[Document], gap_policy: GapPolicy = FAST_GAPS
) -> Outcome:
    return await project(
        event,
        projections=[AccountsProjection(VersionedCollection(database[ACCOUNTS]))],
        checkpoints=MongoCheckpoints(database[CHECKPOINTS_COLLECTION]),
        gap_policy=gap_policy,
    )


async def account(database: AsyncDatabase[Document], account_id: UUID) -> Document | None:
    return await database[ACCOUNTS].find_one({"_id": str(account_id)})


async def test_applies_an_account_stream_in_order(database: AsyncDatabase[Document]) -> None:
    account_id = uuid4()
    stream = [
        *opened_account(account_id, owner_id="alice", currency="EUR", deposit=1_000),
        envelope(account_id, 3, MoneyWithdrawn(amount=300)),
        envelope(account_id, 4, AccountFrozen()),
        envelope(account_id, 5, AccountUnfrozen()),
        envelope(account_id, 6, MoneyDeposited(amount=45)),
    ]

    outcomes = [await run(event, database) for event in stream]

    assert outcomes == [APPLIED] * len(stream)
    assert await account(database, account_id) == {
        "_id": str(account_id),
        "id": str(account_id),
        "owner_id": "alice",
        "currency": "EUR",
        "balance": 745,
        "status": "open",
        "version": 6,
        "opened_at": stream[0].recorded_at,
        "updated_at": stream[-1].recorded_at,
        "last_position": stream[-1].position,
    }


async def test_status_follows_freeze_and_close(database: AsyncDatabase[Document]) -> None:
    account_id = uuid4()
    for event in opened_account(account_id):
        await run(event, database)

    await run(envelope(account_id, 2, AccountFrozen()), database)
    frozen = await account(database, account_id)
    await run(envelope(account_id, 3, AccountUnfrozen()), database)
    await run(envelope(account_id, 4, AccountClosed()), database)
    closed = await account(database, account_id)

    assert frozen is not None and frozen["status"] == "frozen"
    assert closed is not None and closed["status"] == "closed"


async def test_a_duplicate_event_changes_nothing(database: AsyncDatabase[Document]) -> None:
    account_id = uuid4()
    stream = [
        *opened_account(account_id, deposit=500),
        envelope(account_id, 3, MoneyWithdrawn(amount=200)),
    ]
    for event in stream:
        await run(event, database)
    before = await account(database, account_id)

    redelivered = [await run(event, database) for event in stream]

    assert redelivered == [DUPLICATE] * len(stream)
    assert await account(database, account_id) == before
    assert before is not None and before["balance"] == 300 and before["version"] == 3


async def test_an_event_after_a_gap_is_not_applied(database: AsyncDatabase[Document]) -> None:
    account_id = uuid4()
    for event in opened_account(account_id, deposit=100):
        await run(event, database)
    before = await account(database, account_id)

    outcome = await run(envelope(account_id, 4, MoneyDeposited(amount=7)), database)

    assert isinstance(outcome, Rejected)
    assert outcome.reason == (
        f"version gap in projection accounts: aggregate {account_id} is at version 2, "
        "event MoneyDeposited has version 4 (expected 3)"
    )
    assert await account(database, account_id) == before


async def test_an_event_for_an_unknown_account_is_not_applied(
    database: AsyncDatabase[Document],
) -> None:
    account_id = uuid4()

    outcome = await run(envelope(account_id, 2, MoneyDeposited(amount=7)), database)

    assert isinstance(outcome, Rejected)
    assert f"aggregate {account_id} is unknown" in outcome.reason
    assert await account(database, account_id) is None
    assert await MongoCheckpoints(database[CHECKPOINTS_COLLECTION]).position("accounts") is None


async def test_an_early_event_waits_for_the_missing_one(
    database: AsyncDatabase[Document],
) -> None:
    account_id = uuid4()
    opening, deposit = opened_account(account_id, deposit=100)
    await run(opening, database)
    withdrawal = envelope(account_id, 3, MoneyWithdrawn(amount=40))

    early = asyncio.create_task(
        run(withdrawal, database, GapPolicy(attempts=100, delay_seconds=0.02))
    )
    await asyncio.sleep(0.1)
    assert not early.done()
    assert await run(deposit, database) == APPLIED

    assert await early == APPLIED
    stored = await account(database, account_id)
    assert stored is not None
    assert (stored["balance"], stored["version"]) == (60, 3)


async def test_invalid_event_data_is_rejected_unapplied(
    database: AsyncDatabase[Document],
) -> None:
    account_id = uuid4()
    for event in opened_account(account_id, deposit=100):
        await run(event, database)
    bad = envelope(account_id, 3, MoneyDeposited(amount=1)).model_copy(
        update={"data": {"amount": -5}}
    )

    outcome = await run(bad, database)

    assert outcome == Rejected(
        "invalid event for projection accounts: amount must be positive, got -5"
    )
    stored = await account(database, account_id)
    assert stored is not None and stored["version"] == 2 and stored["balance"] == 100


async def test_stores_the_highest_position_as_checkpoint(
    database: AsyncDatabase[Document],
) -> None:
    account_id = uuid4()
    stream = opened_account(account_id, deposit=100)
    for event in stream:
        await run(event, database)
    await run(stream[0], database)  # a late duplicate must not move the checkpoint back

    checkpoint = await database[CHECKPOINTS_COLLECTION].find_one({"_id": "accounts"})

    assert checkpoint == {"_id": "accounts", "position": stream[1].position}


async def test_concurrent_checkpoint_writers_keep_the_maximum(
    database: AsyncDatabase[Document],
) -> None:
    checkpoints = MongoCheckpoints(database[CHECKPOINTS_COLLECTION])

    await asyncio.gather(*(checkpoints.advance("race", position) for position in range(1, 41)))

    assert await checkpoints.position("race") == 40


async def test_a_creating_event_must_be_version_one(database: AsyncDatabase[Document]) -> None:
    documents = VersionedCollection(database[ACCOUNTS])

    with pytest.raises(InvalidEvent, match="version 1"):
        await documents.create("x", version=2, position=1, fields={})
    result = await documents.create("x", version=1, position=1, fields={})
    again = await documents.create("x", version=1, position=2, fields={})

    assert result.status is ApplyStatus.APPLIED
    assert (again.status, again.stored_version) == (ApplyStatus.DUPLICATE, 1)


async def test_a_duplicate_opening_keeps_the_first_one(
    database: AsyncDatabase[Document],
) -> None:
    account_id = uuid4()
    projection = AccountsProjection(VersionedCollection(database[ACCOUNTS]))
    first = envelope(account_id, 1, AccountOpened(owner_id="alice", currency="EUR"))
    await projection.apply(first)

    result = await projection.apply(
        envelope(account_id, 1, AccountOpened(owner_id="mallory", currency="USD"))
    )

    stored = await account(database, account_id)
    assert result.status is ApplyStatus.DUPLICATE
    assert stored is not None and (stored["owner_id"], stored["currency"]) == ("alice", "EUR")


async def test_the_client_reads_back_aware_datetimes(services: Services, mongo_db: str) -> None:
    client: AsyncMongoClient[Document] = create_client(services.mongo_url)
    try:
        account_id = uuid4()
        await run(opened_account(account_id)[0], client[mongo_db])
        stored = await account(client[mongo_db], account_id)
    finally:
        await client.close()
    assert stored is not None and stored["opened_at"].utcoffset() is not None
