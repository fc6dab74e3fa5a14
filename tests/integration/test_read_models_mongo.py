"""The ledger's read models on the real MongoDB server: order, exactly-once, gaps, batches.

Each projection is fed directly (no broker): in order, redelivered, ahead of a missing event,
concurrently, and in replay batches that must have the same effect as one event at a time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import create_client
from query_service.domains.ledger.views import owner_summary
from query_service.projections.base import ApplyStatus, BatchProjection
from query_service.projections.store import Document
from query_service.service_layer.catalog import ReadModelCatalog
from shared.ledger import (
    TRANSFER,
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    MoneyCreditedFromTransfer,
    MoneyDebitedForTransfer,
    MoneyDeposited,
    MoneyWithdrawn,
    TransferCompleted,
    TransferDebitRefunded,
    TransferDebitSettled,
    TransferFailed,
    TransferRequested,
)
from shared.messages import EventEnvelope
from tests.conftest import Services
from tests.query_support import (
    OWNER_ACCOUNTS,
    TRANSACTION_HEADS,
    TRANSACTIONS,
    TRANSFERS,
    envelope,
    opened_account,
)
from tests.read_model_support import differences, generation_snapshot, ledger_catalog

pytestmark = pytest.mark.integration


@pytest.fixture
async def database(services: Services, mongo_db: str) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(services.mongo_url)
    yield client[mongo_db]
    await client.close()


@pytest.fixture
def catalog(database: AsyncDatabase[Document]) -> ReadModelCatalog:
    return ledger_catalog(database)


def projection(catalog: ReadModelCatalog, name: str, generation: int = 1) -> BatchProjection:
    return catalog.projection(name, generation)


async def statuses(target: BatchProjection, events: list[EventEnvelope]) -> list[ApplyStatus]:
    return [(await target.apply(event)).status for event in events]


APPLIED, DUPLICATE, GAP = ApplyStatus.APPLIED, ApplyStatus.DUPLICATE, ApplyStatus.GAP


class TestTransactions:
    async def test_records_one_entry_per_money_movement_newest_first(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        account, other, transfer = uuid4(), uuid4(), uuid4()
        stream = [
            *opened_account(account, deposit=1_000),
            envelope(account, 3, MoneyWithdrawn(amount=300)),
            envelope(account, 4, AccountFrozen()),
            envelope(account, 5, AccountUnfrozen()),
            envelope(
                account,
                6,
                MoneyDebitedForTransfer(
                    transfer_id=transfer, amount=200, currency="EUR", to_account_id=other
                ),
            ),
            envelope(
                account,
                7,
                TransferDebitRefunded(
                    transfer_id=transfer, amount=200, code="account_closed", reason="closed"
                ),
            ),
            envelope(
                account,
                8,
                MoneyCreditedFromTransfer(transfer_id=transfer, amount=50, from_account_id=other),
            ),
            envelope(account, 9, TransferDebitSettled(transfer_id=transfer)),
        ]

        assert await statuses(projection(catalog, "transactions"), stream) == [APPLIED] * 9

        entries = (
            await database[TRANSACTIONS]
            .find({"account_id": str(account)})
            .sort("version", -1)
            .to_list()
        )
        assert [(e["version"], e["kind"], e["amount"], e["balance_after"]) for e in entries] == [
            (8, "transfer_in", 50, 750),
            (7, "transfer_refund", 200, 700),
            (6, "transfer_out", -200, 500),
            (3, "withdrawal", -300, 700),
            (2, "deposit", 1_000, 1_000),
        ]
        assert entries[0]["counterparty_account_id"] == str(other)
        assert entries[1]["code"] == "account_closed"
        assert entries[2]["transfer_id"] == str(transfer)
        head = await database[TRANSACTION_HEADS].find_one({"_id": str(account)})
        assert head is not None and (head["version"], head["balance"]) == (9, 750)

    async def test_a_redelivered_event_adds_no_entry(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        account = uuid4()
        stream = [
            *opened_account(account, deposit=100),
            envelope(account, 3, MoneyDeposited(amount=5)),
        ]
        target = projection(catalog, "transactions")
        await statuses(target, stream)
        before = await database[TRANSACTIONS].find({}).to_list()

        assert await statuses(target, stream) == [DUPLICATE] * 3
        assert await database[TRANSACTIONS].find({}).to_list() == before
        assert len(before) == 2

    async def test_an_event_after_a_gap_writes_nothing(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        account = uuid4()
        target = projection(catalog, "transactions")
        await statuses(target, opened_account(account, deposit=100))

        result = await target.apply(envelope(account, 4, MoneyDeposited(amount=7)))
        unknown = await target.apply(envelope(uuid4(), 2, MoneyDeposited(amount=7)))

        assert (result.status, result.stored_version) == (GAP, 2)
        assert (unknown.status, unknown.stored_version) == (GAP, None)
        assert await database[TRANSACTIONS].count_documents({"version": 4}) == 0
        head = await database[TRANSACTION_HEADS].find_one({"_id": str(account)})
        assert head is not None and head["version"] == 2


async def owner_totals(catalog: ReadModelCatalog, owner: str) -> dict[str, tuple[int, int]]:
    """The owner's totals as the API reads them: currency -> (balance, accounts)."""
    summary = await owner_summary(owner, catalog=catalog)
    return {} if summary is None else {t.currency: (t.balance, t.accounts) for t in summary.totals}


class TestOwnerSummaries:
    async def test_sums_balances_per_currency_over_an_owners_accounts(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        euro, euro2, pound = uuid4(), uuid4(), uuid4()
        target = projection(catalog, "owner_summaries")
        stream = [
            *opened_account(euro, owner_id="olga", currency="EUR", deposit=500),
            *opened_account(euro2, owner_id="olga", currency="EUR", deposit=20),
            *opened_account(pound, owner_id="olga", currency="GBP", deposit=70),
            envelope(euro, 3, MoneyWithdrawn(amount=100)),
            envelope(pound, 3, AccountFrozen()),
            envelope(euro2, 3, MoneyWithdrawn(amount=20)),
            envelope(euro2, 4, AccountClosed()),
        ]

        assert await statuses(target, stream) == [APPLIED] * len(stream)

        assert await owner_totals(catalog, "olga") == {"EUR": (400, 2), "GBP": (70, 1)}
        accounts = {
            doc["_id"]: doc async for doc in database[OWNER_ACCOUNTS].find({"owner_id": "olga"})
        }
        assert set(accounts) == {str(euro), str(euro2), str(pound)}
        assert (accounts[str(euro)]["balance"], accounts[str(euro)]["version"]) == (400, 3)
        assert accounts[str(pound)]["status"] == "frozen"
        assert accounts[str(euro2)]["status"] == "closed"

    async def test_duplicates_and_gaps_change_nothing(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        account = uuid4()
        target = projection(catalog, "owner_summaries")
        stream = [
            *opened_account(account, owner_id="dup", deposit=100),
            envelope(account, 3, MoneyDeposited(amount=1)),
        ]
        await statuses(target, stream)
        before = await database[OWNER_ACCOUNTS].find({}).to_list()

        assert await statuses(target, stream) == [DUPLICATE] * 3
        await target.apply_batch(stream)
        gap = await target.apply(envelope(account, 5, MoneyDeposited(amount=9)))
        before_opening = await target.apply(envelope(uuid4(), 2, MoneyDeposited(amount=9)))

        assert (gap.status, gap.stored_version) == (GAP, 3)
        assert (before_opening.status, before_opening.stored_version) == (GAP, None)
        assert await database[OWNER_ACCOUNTS].find({}).to_list() == before
        assert await owner_totals(catalog, "dup") == {"EUR": (101, 1)}

    async def test_concurrent_first_accounts_of_a_new_owner_are_both_kept(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        # Different accounts live in different partitions, so their openings can race.
        accounts = [uuid4() for _ in range(6)]
        target = projection(catalog, "owner_summaries")
        openings = [
            envelope(account, 1, AccountOpened(owner_id="race", currency="EUR"))
            for account in accounts
        ]

        results = await asyncio.gather(*(target.apply(event) for event in openings))

        assert [result.status for result in results] == [APPLIED] * len(accounts)
        stored = await database[OWNER_ACCOUNTS].find({"owner_id": "race"}).to_list()
        assert {doc["_id"] for doc in stored} == {str(a) for a in accounts}
        assert await owner_totals(catalog, "race") == {"EUR": (0, len(accounts))}

    async def test_a_second_opening_with_other_data_keeps_the_first(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        account = uuid4()
        target = projection(catalog, "owner_summaries")
        await target.apply(envelope(account, 1, AccountOpened(owner_id="first", currency="EUR")))

        again = await target.apply(
            envelope(account, 1, AccountOpened(owner_id="mallory", currency="USD"))
        )

        assert again.status is DUPLICATE
        assert await owner_totals(catalog, "mallory") == {}
        assert await owner_totals(catalog, "first") == {"EUR": (0, 1)}


class TestTransfers:
    async def test_follows_a_transfer_to_its_outcome(
        self, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
    ) -> None:
        done, failed = uuid4(), uuid4()
        source, sink = uuid4(), uuid4()
        requested = TransferRequested(from_account_id=source, to_account_id=sink, amount=25)
        target = projection(catalog, "transfers")

        results = await statuses(
            target,
            [
                envelope(done, 1, requested, aggregate_type=TRANSFER),
                envelope(done, 2, TransferCompleted(), aggregate_type=TRANSFER),
                envelope(failed, 1, requested, aggregate_type=TRANSFER),
                envelope(
                    failed,
                    2,
                    TransferFailed(code="insufficient_funds", reason="balance is 3"),
                    aggregate_type=TRANSFER,
                ),
            ],
        )

        assert results == [APPLIED] * 4
        completed = await database[TRANSFERS].find_one({"_id": str(done)})
        assert completed is not None
        assert (completed["status"], completed["amount"], completed["failure"]) == (
            "completed",
            25,
            None,
        )
        assert completed["from_account_id"] == str(source)
        refused = await database[TRANSFERS].find_one({"_id": str(failed)})
        assert refused is not None and refused["status"] == "failed"
        assert refused["failure"] == {"code": "insufficient_funds", "reason": "balance is 3"}

    async def test_an_outcome_before_the_request_waits(self, catalog: ReadModelCatalog) -> None:
        transfer = uuid4()
        target = projection(catalog, "transfers")
        completed = envelope(transfer, 2, TransferCompleted(), aggregate_type=TRANSFER)

        early = await target.apply(completed)
        requested = TransferRequested(from_account_id=uuid4(), to_account_id=uuid4(), amount=1)
        await target.apply(envelope(transfer, 1, requested, aggregate_type=TRANSFER))
        late = await target.apply(completed)
        again = await target.apply(completed)

        assert (early.status, late.status, again.status) == (GAP, APPLIED, DUPLICATE)


def ledger_history(seed: int, accounts: int = 6, events: int = 80) -> list[EventEnvelope]:
    """A plausible interleaved history of several accounts and transfers, in position order."""
    rng = random.Random(seed)
    ids = [uuid4() for _ in range(accounts)]
    versions: dict[UUID, int] = {}
    history: list[EventEnvelope] = []

    def emit(aggregate: UUID, event: object, aggregate_type: str = "account") -> None:
        versions[aggregate] = versions.get(aggregate, 0) + 1
        history.append(
            envelope(aggregate, versions[aggregate], event, aggregate_type=aggregate_type)  # type: ignore[arg-type]
        )

    for index, account in enumerate(ids):
        emit(account, AccountOpened(owner_id=f"owner{index % 3}", currency="EUR"))
        emit(account, MoneyDeposited(amount=1_000))
    for _ in range(events):
        account = rng.choice(ids)
        match rng.randrange(4):
            case 0:
                emit(account, MoneyDeposited(amount=rng.randint(1, 50)))
            case 1:
                emit(account, MoneyWithdrawn(amount=rng.randint(1, 10)))
            case 2:
                transfer, sink = uuid4(), rng.choice([a for a in ids if a != account])
                emit(
                    transfer,
                    TransferRequested(from_account_id=account, to_account_id=sink, amount=5),
                    TRANSFER,
                )
                emit(
                    account,
                    MoneyDebitedForTransfer(
                        transfer_id=transfer, amount=5, currency="EUR", to_account_id=sink
                    ),
                )
                emit(
                    sink,
                    MoneyCreditedFromTransfer(
                        transfer_id=transfer, amount=5, from_account_id=account
                    ),
                )
                emit(account, TransferDebitSettled(transfer_id=transfer))
                emit(transfer, TransferCompleted(), TRANSFER)
            case _:
                emit(account, AccountFrozen())
                emit(account, AccountUnfrozen())
    return history


@pytest.mark.parametrize("name", ["accounts", "transactions", "owner_summaries", "transfers"])
async def test_a_replay_batch_has_the_effect_of_one_event_at_a_time(
    name: str, catalog: ReadModelCatalog, database: AsyncDatabase[Document]
) -> None:
    history = ledger_history(seed=7)
    one_by_one, batched = projection(catalog, name, 1), projection(catalog, name, 2)
    for event in history:
        if one_by_one.handles(event):
            await one_by_one.apply(event)
    # The live projector got ahead on some aggregates before the replay reached them, a few
    # events are redelivered, and one batch boundary falls in the middle of everything.
    for event in history[::7]:
        if batched.handles(event) and event.version == 1:
            await batched.apply(event)
    await batched.apply_batch(history[:50])
    await batched.apply_batch(history[40:] + history[60:70])

    assert (
        differences(
            await generation_snapshot(database, name, 2),
            await generation_snapshot(database, name, 1),
        )
        == []
    )


async def test_a_replay_batch_skips_what_follows_a_gap(
    catalog: ReadModelCatalog, database: AsyncDatabase[Document]
) -> None:
    account = uuid4()
    events = [
        *opened_account(account, deposit=10),
        envelope(account, 4, MoneyDeposited(amount=1)),  # version 3 never arrives
        envelope(account, 5, MoneyDeposited(amount=1)),
    ]
    for name in ("accounts", "transactions", "owner_summaries"):
        await projection(catalog, name, 2).apply_batch(events)

    rebuilt = await generation_snapshot(database, "transactions", 2)
    assert [entry["version"] for entry in rebuilt["transactions"]] == [2]
    assert [head["version"] for head in rebuilt["transaction_heads"]] == [2]
    accounts = await generation_snapshot(database, "accounts", 2)
    assert [(doc["version"], doc["balance"]) for doc in accounts["accounts"]] == [(2, 10)]
    owners = await generation_snapshot(database, "owner_summaries", 2)
    assert [(doc["version"], doc["balance"]) for doc in owners["owner_accounts"]] == [(2, 10)]
