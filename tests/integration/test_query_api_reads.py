"""The HTTP API's reads over real MongoDB read models: lists, pages, summaries, transfers,
read-your-writes waits, and readiness against the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import uuid4

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import create_client
from query_service.bootstrap import start_projector
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.settings import QueryServiceSettings
from shared.ledger import (
    TRANSFER,
    AccountFrozen,
    MoneyDebitedForTransfer,
    MoneyDeposited,
    MoneyWithdrawn,
    TransferFailed,
    TransferRequested,
)
from shared.messages import EventEnvelope
from tests.conftest import Services
from tests.query_support import envelope, opened_account, served
from tests.read_model_support import replay_one_by_one

pytestmark = pytest.mark.integration

WAIT = 1.0


@pytest.fixture
def settings(services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(
        amqp_url=services.amqp_url,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        read_wait_seconds=WAIT,
        projector_partitions=2,
    )


@pytest.fixture
async def database(settings: QueryServiceSettings) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(settings.mongo_url)
    yield client[settings.mongo_db]
    await client.close()


@pytest.fixture
async def api(
    settings: QueryServiceSettings, database: AsyncDatabase[Document]
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, database=database)
    async with served(app) as client:
        yield client


async def feed(database: AsyncDatabase[Document], events: list[EventEnvelope]) -> None:
    await replay_one_by_one(database, events)


async def all_pages(api: httpx.AsyncClient, url: str, **params: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await api.get(url, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([item["id"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


async def test_lists_accounts_by_filter_in_stable_pages(
    api: httpx.AsyncClient, database: AsyncDatabase[Document]
) -> None:
    alice = [uuid4() for _ in range(5)]
    bob = [uuid4() for _ in range(2)]
    events = [e for a in alice for e in opened_account(a, owner_id="alice", deposit=10)]
    events += [e for a in bob for e in opened_account(a, owner_id="bob", currency="USD")]
    events.append(envelope(alice[0], 3, AccountFrozen()))
    await feed(database, events)

    pages = await all_pages(api, "/accounts", owner_id="alice", limit=2)
    frozen = (await api.get("/accounts", params={"status": "frozen"})).json()
    dollars = (await api.get("/accounts", params={"currency": "USD", "status": "open"})).json()
    everything = await all_pages(api, "/accounts", limit=3)

    assert [len(page) for page in pages] == [2, 2, 1]
    listed = [account for page in pages for account in page]
    assert listed == sorted(str(a) for a in alice)
    assert [item["id"] for item in frozen["items"]] == [str(alice[0])]
    assert frozen["items"][0]["status"] == "frozen" and frozen["next_cursor"] is None
    assert sorted(item["id"] for item in dollars["items"]) == sorted(str(b) for b in bob)
    assert [a for page in everything for a in page] == sorted(str(a) for a in alice + bob)


async def test_pages_through_an_accounts_transactions_newest_first(
    api: httpx.AsyncClient, database: AsyncDatabase[Document]
) -> None:
    account = uuid4()
    await feed(
        database,
        [
            *opened_account(account, deposit=100),
            *(envelope(account, v, MoneyDeposited(amount=v)) for v in range(3, 8)),
            envelope(account, 8, MoneyWithdrawn(amount=30)),
        ],
    )
    url = f"/accounts/{account}/transactions"

    first = (await api.get(url, params={"limit": 4})).json()
    second = (await api.get(url, params={"limit": 4, "cursor": first["next_cursor"]})).json()

    assert (first["account_id"], first["version"]) == (str(account), 8)
    assert [t["version"] for t in first["items"]] == [8, 7, 6, 5]
    assert [t["version"] for t in second["items"]] == [4, 3, 2]
    assert second["next_cursor"] is None
    assert first["items"][0] == {
        **first["items"][0],
        "kind": "withdrawal",
        "amount": -30,
        "balance_after": 100 + sum(range(3, 8)) - 30,
    }
    assert (await api.get(f"/accounts/{uuid4()}/transactions")).status_code == 404


async def test_shows_an_owner_summary(
    api: httpx.AsyncClient, database: AsyncDatabase[Document]
) -> None:
    euro, pound = uuid4(), uuid4()
    await feed(
        database,
        [
            *opened_account(euro, owner_id="olga", deposit=300),
            *opened_account(pound, owner_id="olga", currency="GBP", deposit=5),
            envelope(euro, 3, MoneyWithdrawn(amount=50)),
        ],
    )

    response = await api.get("/owners/olga/summary")

    assert response.status_code == 200
    body = response.json()
    assert body["owner_id"] == "olga"
    assert body["totals"] == [
        {"currency": "EUR", "balance": 250, "accounts": 1},
        {"currency": "GBP", "balance": 5, "accounts": 1},
    ]
    assert {a["id"]: (a["balance"], a["version"]) for a in body["accounts"]} == {
        str(euro): (250, 3),
        str(pound): (5, 2),
    }
    assert (await api.get("/owners/nobody/summary")).status_code == 404


async def test_pages_an_owners_accounts_with_totals_over_all_of_them(
    api: httpx.AsyncClient, database: AsyncDatabase[Document]
) -> None:
    accounts = sorted((uuid4() for _ in range(5)), key=str)
    events = [
        e
        for index, account in enumerate(accounts)
        for e in opened_account(
            account, owner_id="paula", currency="GBP" if index == 2 else "EUR", deposit=index + 1
        )
    ]
    events.append(envelope(accounts[4], 3, AccountFrozen()))
    await feed(database, events)
    url = "/owners/paula/summary"

    bodies = []
    cursor = None
    while True:
        query: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await api.get(url, params=query)
        assert response.status_code == 200, response.text
        bodies.append(response.json())
        cursor = bodies[-1]["next_cursor"]
        if cursor is None:
            break
    waited = await api.get(
        url, params={"limit": 1, "account_id": str(accounts[4]), "min_version": 3}
    )

    assert [[a["id"] for a in body["accounts"]] for body in bodies] == [
        [str(a) for a in accounts[0:2]],
        [str(a) for a in accounts[2:4]],
        [str(accounts[4])],
    ]
    totals = [
        {"currency": "EUR", "balance": 1 + 2 + 4 + 5, "accounts": 4},
        {"currency": "GBP", "balance": 3, "accounts": 1},
    ]
    assert all(body["totals"] == totals for body in bodies)
    assert all(body["owner_id"] == "paula" for body in bodies)
    assert bodies[-1]["accounts"][0]["status"] == "frozen"
    assert waited.status_code == 200
    assert (waited.json()["totals"], len(waited.json()["accounts"])) == (totals, 1)
    assert waited.json()["next_cursor"] is not None
    latest = events[-1].recorded_at  # the freezing, the last event of any of its accounts
    assert all(datetime.fromisoformat(body["updated_at"]) == latest for body in bodies)


async def test_shows_a_transfer_and_its_failure(
    api: httpx.AsyncClient, database: AsyncDatabase[Document]
) -> None:
    transfer, source, sink = uuid4(), uuid4(), uuid4()
    await feed(
        database,
        [
            envelope(
                transfer,
                1,
                TransferRequested(from_account_id=source, to_account_id=sink, amount=40),
                aggregate_type=TRANSFER,
            ),
            envelope(
                transfer,
                2,
                TransferFailed(code="account_frozen", reason="frozen"),
                aggregate_type=TRANSFER,
            ),
        ],
    )

    body = (await api.get(f"/transfers/{transfer}")).json()

    assert {k: body[k] for k in ("id", "status", "from_account_id", "to_account_id", "amount")} == {
        "id": str(transfer),
        "status": "failed",
        "from_account_id": str(source),
        "to_account_id": str(sink),
        "amount": 40,
    }
    assert body["failure"] == {"code": "account_frozen", "reason": "frozen"}
    assert (await api.get(f"/transfers/{uuid4()}")).status_code == 404


class TestReadYourWrites:
    async def test_waits_for_the_version_asked_for(
        self, api: httpx.AsyncClient, database: AsyncDatabase[Document]
    ) -> None:
        account, transfer = uuid4(), uuid4()
        await feed(database, opened_account(account, owner_id="ryw", deposit=100))
        later = [
            envelope(
                account,
                3,
                MoneyDebitedForTransfer(
                    transfer_id=transfer, amount=10, currency="EUR", to_account_id=uuid4()
                ),
            )
        ]

        async def project_later() -> None:
            await asyncio.sleep(0.3)
            await feed(database, later)

        background = asyncio.create_task(project_later())
        detail, history, summary = await asyncio.gather(
            api.get(f"/accounts/{account}", params={"min_version": 3}),
            api.get(f"/accounts/{account}/transactions", params={"min_version": 3}),
            api.get(
                "/owners/ryw/summary",
                params={"account_id": str(account), "min_position": later[0].position},
            ),
        )
        await background

        assert detail.status_code == 200 and detail.json()["version"] == 3
        assert detail.json()["balance"] == 90
        assert history.status_code == 200 and history.json()["items"][0]["version"] == 3
        assert summary.status_code == 200
        assert summary.json()["totals"][0]["balance"] == 90

    async def test_answers_504_when_the_projection_does_not_get_there_in_time(
        self, api: httpx.AsyncClient, database: AsyncDatabase[Document]
    ) -> None:
        account = uuid4()
        await feed(database, opened_account(account, deposit=100))

        behind = await api.get(f"/accounts/{account}", params={"min_version": 3})
        unknown = await api.get(f"/transfers/{uuid4()}", params={"min_version": 1})

        assert behind.status_code == 504
        assert behind.headers["retry-after"] == "1"
        body = behind.json()
        assert body["required"] == {"min_version": 3, "min_position": None}
        assert body["current"]["version"] == 2
        assert "has not reached" in body["detail"]
        assert unknown.status_code == 504 and unknown.json()["current"] is None

    async def test_a_summary_wait_must_name_its_account(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/owners/olga/summary", params={"min_version": 2})

        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", "account_id"]

    async def test_without_a_wait_an_unknown_account_is_404_at_once(
        self, api: httpx.AsyncClient
    ) -> None:
        response = await api.get(f"/accounts/{uuid4()}")
        assert response.status_code == 404


async def test_ready_when_stores_answer_and_the_lag_is_small(
    settings: QueryServiceSettings, database: AsyncDatabase[Document], broker: str
) -> None:
    app = create_app(settings, database=database)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as api,
    ):
        # No projector has declared its queues yet: the lag is unknown, so not ready.
        before = await api.get("/readyz")
        projector = await start_projector(settings, database)
        try:
            after = await api.get("/readyz")
        finally:
            await projector.stop(grace_seconds=2)

    assert before.status_code == 503
    assert before.json()["checks"]["mongo"] == {"ok": True}
    assert before.json()["checks"]["lag"]["ok"] is False
    assert after.status_code == 200, after.text
    body = after.json()
    assert body["status"] == "ready"
    assert body["checks"]["lag"]["events"] == 0
    assert body["detail"]["parked"]["queue"] == 0
    assert set(body["detail"]["read_models"]) == {
        "accounts",
        "transactions",
        "owner_summaries",
        "transfers",
    }
