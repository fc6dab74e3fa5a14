"""The HTTP API over a real MongoDB read model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast
from uuid import uuid4

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ServerSelectionTimeoutError

from query_service.adapters.mongo import CHECKPOINTS_COLLECTION, MongoCheckpoints, create_client
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.service_layer.catalog import FIRST_GENERATION
from query_service.service_layer.projector import project
from query_service.settings import QueryServiceSettings
from shared.ledger import AccountFrozen, MoneyWithdrawn
from tests.conftest import Services
from tests.query_support import envelope, opened_account, served
from tests.read_model_support import ledger_catalog

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(mongo_url=services.mongo_url, mongo_db=mongo_db)


@pytest.fixture
async def api(settings: QueryServiceSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its own lifespan (its own MongoDB client), as uvicorn would run it."""
    app = create_app(settings)
    async with served(app) as client:
        yield client


@pytest.fixture
async def database(settings: QueryServiceSettings) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(settings.mongo_url)
    yield client[settings.mongo_db]
    await client.close()


async def test_shows_a_projected_account(
    api: httpx.AsyncClient, database: AsyncDatabase[Document]
) -> None:
    account_id = uuid4()
    stream = [
        *opened_account(account_id, owner_id="carol", currency="GBP", deposit=900),
        envelope(account_id, 3, MoneyWithdrawn(amount=150)),
        envelope(account_id, 4, AccountFrozen()),
    ]
    for event in stream:
        catalog = ledger_catalog(database)
        await project(
            event,
            projections=[catalog.projection(name, FIRST_GENERATION) for name in catalog.models],
            checkpoints=MongoCheckpoints(database[CHECKPOINTS_COLLECTION]),
        )

    response = await api.get(f"/accounts/{account_id}")

    assert response.status_code == 200
    assert response.json() == {
        "id": str(account_id),
        "owner_id": "carol",
        "currency": "GBP",
        "balance": 750,
        "status": "frozen",
        "version": 4,
        "last_position": stream[-1].position,
        "opened_at": "2025-01-01T00:00:01Z",
        "updated_at": "2025-01-01T00:00:04Z",
    }


async def test_an_unknown_account_is_404(api: httpx.AsyncClient) -> None:
    response = await api.get(f"/accounts/{uuid4()}")

    assert response.status_code == 404
    assert response.json() == {"detail": "account not found"}


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "12345", "0" * 33])
async def test_a_malformed_account_id_is_422(api: httpx.AsyncClient, bad_id: str) -> None:
    response = await api.get(f"/accounts/{bad_id}")

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "account_id"]


async def test_healthz(api: httpx.AsyncClient) -> None:
    response = await api.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def _refused() -> ServerSelectionTimeoutError:
    return ServerSelectionTimeoutError("127.0.0.1:27017: [Errno 111] Connection refused")


class _UnreachableCursor:
    def __aiter__(self) -> _UnreachableCursor:
        return self

    async def __anext__(self) -> Document:
        raise _refused()


class _UnreachableCollection:
    async def find_one(self, *args: object, **kwargs: object) -> Document | None:
        raise _refused()

    def find(self, *args: object, **kwargs: object) -> _UnreachableCursor:
        return _UnreachableCursor()


class _UnreachableDatabase:
    def __getitem__(self, name: str) -> _UnreachableCollection:
        return _UnreachableCollection()


async def test_an_unreachable_store_is_503_not_500(settings: QueryServiceSettings) -> None:
    # A stand-in rather than a client aimed at a dead port: closing such a client while its
    # monitor is mid-connect leaks a socket inside PyMongo, which the warning filter turns
    # into a failure of whichever test runs next.
    database = cast(AsyncDatabase[Document], _UnreachableDatabase())
    app = create_app(settings, database=database)
    async with served(app) as api:
        response = await api.get(f"/accounts/{uuid4()}")

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "read store unavailable", "reason": "store_unavailable"}
