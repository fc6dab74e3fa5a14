"""Owner summaries stay bounded: an owner with 10,000 accounts on the real MongoDB server.

The events go through the real projection, most through its batch path (as a rebuild writes
them) and the rest one at a time (as the live projector does); the API then pages through every
account exactly once, the totals are exact (beyond what a 64-bit integer holds), no stored
document grows with the number of accounts, and redelivering everything changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import bson
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import create_client
from query_service.entrypoints.api.app import create_app
from query_service.projections.base import ApplyStatus
from query_service.projections.store import Document
from query_service.service_layer.catalog import ReadModelCatalog
from query_service.settings import QueryServiceSettings
from shared.ledger import (
    MAX_BALANCE,
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    MoneyDeposited,
    MoneyWithdrawn,
)
from shared.messages import Event, EventEnvelope
from tests.conftest import Services
from tests.query_support import envelope, served
from tests.read_model_support import ledger_catalog

pytestmark = pytest.mark.integration

OWNER = "many"
ACCOUNTS = 10_000
LIVE = 200  # the last accounts are opened one event at a time; the others in batches
BATCH = 500  # CQRS_REBUILD_BATCH_SIZE's default
PAGE = 200
# A stored document of one account is about 200 bytes; the old per-owner document held all of
# them (about 1.7 MB here, 16 MiB at about 10^5 accounts).
LARGEST_DOCUMENT = 1_024


@pytest.fixture
async def database(services: Services, mongo_db: str) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(services.mongo_url)
    yield client[mongo_db]
    await client.close()


@pytest.fixture
def catalog(database: AsyncDatabase[Document]) -> ReadModelCatalog:
    return ledger_catalog(database)


@pytest.fixture
async def api(
    services: Services, mongo_db: str, database: AsyncDatabase[Document]
) -> AsyncIterator[httpx.AsyncClient]:
    settings = QueryServiceSettings(
        mongo_url=services.mongo_url, mongo_db=mongo_db, read_wait_seconds=1
    )
    async with served(create_app(settings, database=database)) as http:
        yield http


class Ledger:
    """The events of one owner's accounts, and the balances they must add up to."""

    def __init__(self) -> None:
        self.versions: dict[UUID, int] = {}
        self.currency: dict[UUID, str] = {}
        self.balance: dict[UUID, int] = {}
        self.status: dict[UUID, str] = {}

    def emit(self, account: UUID, event: Event) -> EventEnvelope:
        self.versions[account] = self.versions.get(account, 0) + 1
        match event:
            case AccountOpened(currency=currency):
                self.currency[account], self.balance[account] = currency, 0
                self.status[account] = "open"
            case MoneyDeposited(amount=amount):
                self.balance[account] += amount
            case MoneyWithdrawn(amount=amount):
                self.balance[account] -= amount
            case AccountFrozen():
                self.status[account] = "frozen"
            case AccountClosed():
                self.status[account] = "closed"
        return envelope(account, self.versions[account], event)

    def open(self, account: UUID, index: int) -> list[EventEnvelope]:
        # Most in EUR at the balance limit, so the EUR total passes 2^63; the rest in GBP.
        currency, amount = ("GBP", index + 100) if index % 20 == 0 else ("EUR", MAX_BALANCE)
        return [
            self.emit(account, AccountOpened(owner_id=OWNER, currency=currency)),
            self.emit(account, MoneyDeposited(amount=amount)),
        ]

    def totals(self) -> list[dict[str, int | str]]:
        found: dict[str, dict[str, int | str]] = {}
        for account, currency in self.currency.items():
            total = found.setdefault(currency, {"currency": currency, "balance": 0, "accounts": 0})
            total["balance"] = int(total["balance"]) + self.balance[account]
            total["accounts"] = int(total["accounts"]) + 1
        return [found[currency] for currency in sorted(found)]


async def largest_document(catalog: ReadModelCatalog) -> tuple[int, int]:
    """The size in BSON bytes of the largest document of the read model, and how many there are."""
    largest, count = 0, 0
    for collection in catalog.collections("owner_summaries", 1).values():
        async for document in collection.find({}):
            largest = max(largest, len(bson.encode(document)))
            count += 1
    return largest, count


async def test_an_owner_with_ten_thousand_accounts(
    catalog: ReadModelCatalog, api: httpx.AsyncClient
) -> None:
    started = time.perf_counter()
    projection = catalog.projection("owner_summaries", 1)
    ledger = Ledger()
    accounts = [uuid4() for _ in range(ACCOUNTS)]
    batched = [event for i, a in enumerate(accounts[:-LIVE]) for event in ledger.open(a, i)]
    for start in range(0, len(batched), BATCH):
        await projection.apply_batch(batched[start : start + BATCH])
    live: list[EventEnvelope] = []
    for index, account in enumerate(accounts[-LIVE:], start=ACCOUNTS - LIVE):
        live += ledger.open(account, index)
    # Later events one at a time, on accounts written by either path.
    for account in accounts[::97]:
        live.append(ledger.emit(account, MoneyWithdrawn(amount=7)))
        live.append(ledger.emit(account, AccountFrozen()))
    closing = accounts[-1]
    live.append(ledger.emit(closing, MoneyWithdrawn(amount=ledger.balance[closing])))
    live.append(ledger.emit(closing, AccountClosed()))
    assert [(await projection.apply(event)).status for event in live] == [
        ApplyStatus.APPLIED
    ] * len(live)
    projected = time.perf_counter()

    first = await api.get(f"/owners/{OWNER}/summary", params={"limit": PAGE})
    assert first.status_code == 200, first.text
    expected = ledger.totals()
    assert first.json()["totals"] == expected
    assert int(expected[0]["balance"]) > 2**63  # EUR
    assert sum(int(total["accounts"]) for total in expected) == ACCOUNTS

    seen: list[str] = []
    body = first.json()
    pages = 1
    while True:
        assert len(body["accounts"]) <= PAGE
        assert body["totals"] == expected  # every page carries the totals of all accounts
        for item in body["accounts"]:
            account = UUID(item["id"])
            assert (item["balance"], item["status"], item["version"]) == (
                ledger.balance[account],
                ledger.status[account],
                ledger.versions[account],
            )
        seen += [item["id"] for item in body["accounts"]]
        if body["next_cursor"] is None:
            break
        response = await api.get(
            f"/owners/{OWNER}/summary", params={"limit": PAGE, "cursor": body["next_cursor"]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
    walked = time.perf_counter()
    assert seen == sorted(str(account) for account in accounts)  # each once, in id order
    assert pages == ACCOUNTS // PAGE

    largest, documents = await largest_document(catalog)
    print(
        f"\n{ACCOUNTS} accounts: {documents} documents, the largest {largest} bytes; "
        f"largest response {len(first.content)} bytes; "
        f"projected in {projected - started:.1f} s, {pages} pages in {walked - projected:.1f} s"
    )
    assert largest <= LARGEST_DOCUMENT
    assert len(first.content) <= PAGE * 400 + 2_000

    # Everything delivered again, through both paths: nothing counts twice.
    for start in range(0, len(batched), 4 * BATCH):
        await projection.apply_batch(batched[start : start + 4 * BATCH])
    await projection.apply_batch(live)
    sample = live[:: max(1, len(live) // 50)]
    assert {(await projection.apply(event)).status for event in sample} == {ApplyStatus.DUPLICATE}
    again = await api.get(f"/owners/{OWNER}/summary", params={"limit": 1})
    assert again.json()["totals"] == expected
    print(f"redelivered in {time.perf_counter() - walked:.1f} s")
