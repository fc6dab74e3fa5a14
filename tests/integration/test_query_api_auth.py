"""The query API's bearer token (`CQRS_API_TOKEN` / `CQRS_API_TOKEN_FILE`): every route but the
probes, /metrics and the docs refuses a request without it, /admin included."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import create_client
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.settings import QueryServiceSettings
from tests.conftest import Services
from tests.query_support import opened_account, served
from tests.read_model_support import replay_one_by_one

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-tests"
ACCOUNT = uuid4()
# Nothing listens there: readiness answers quickly (503), rebuilds fail fast.
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"


@pytest.fixture
async def api(services: Services, mongo_db: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = QueryServiceSettings(
        amqp_url=NO_BROKER, mongo_url=services.mongo_url, mongo_db=mongo_db, api_token=TOKEN
    )
    client = create_client(settings.mongo_url)
    database: AsyncDatabase[Document] = client[mongo_db]
    await replay_one_by_one(database, opened_account(ACCOUNT, owner_id="alice", deposit=10))
    app = create_app(settings, database=database)
    async with served(app) as http:
        yield http
    await client.close()


PROTECTED = [
    ("GET", f"/accounts/{ACCOUNT}"),
    ("GET", "/accounts?owner_id=alice"),
    ("GET", f"/accounts/{ACCOUNT}/transactions"),
    ("GET", "/owners/alice/summary"),
    ("GET", f"/transfers/{uuid4()}"),
    ("GET", "/admin/read-models"),
    ("GET", "/admin/read-models/accounts"),
    ("POST", "/admin/rebuilds"),
]
WRONG = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("headers", WRONG, ids=lambda h: h.get("Authorization", "none"))
async def test_a_request_without_the_token_is_refused(
    api: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await api.request(method, path, headers=headers, json={"read_models": ["accounts"]})

    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "balance" not in response.text


async def test_the_token_opens_the_reads(api: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}

    account = await api.get(f"/accounts/{ACCOUNT}", headers=auth)
    listed = await api.get("/accounts", params={"owner_id": "alice"}, headers=auth)
    admin = await api.get("/admin/read-models", headers=auth)
    unknown = await api.get(f"/accounts/{uuid4()}", headers=auth)

    assert account.status_code == 200
    assert account.json()["balance"] == 10
    assert [item["id"] for item in listed.json()["items"]] == [str(ACCOUNT)]
    assert admin.status_code == 200
    assert unknown.status_code == 404


async def test_probes_and_docs_stay_open(api: httpx.AsyncClient) -> None:
    health = await api.get("/healthz")
    ready = await api.get("/readyz")
    metrics = await api.get("/metrics")
    docs = await api.get("/docs")
    schema = await api.get("/openapi.json")

    assert health.status_code == 200
    assert ready.status_code == 503  # no broker here, but not 401
    assert metrics.status_code == 200
    assert docs.status_code == 200
    assert schema.status_code == 200


async def test_openapi_documents_the_bearer_scheme(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()

    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`CQRS_API_TOKEN`: `Authorization: Bearer <token>`",
    }
    account = schema["paths"]["/accounts/{account_id}"]["get"]
    assert account["security"] == [{"HTTPBearer": []}]
    assert "401" in account["responses"]
    assert "security" in schema["paths"]["/admin/rebuilds"]["post"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


async def test_without_a_token_setting_nothing_asks_for_one(
    services: Services, mongo_db: str
) -> None:
    settings = QueryServiceSettings(mongo_url=services.mongo_url, mongo_db=mongo_db)
    client = create_client(settings.mongo_url)
    app = create_app(settings, database=client[mongo_db])
    async with served(app) as http:
        response = await http.get(f"/accounts/{ACCOUNT}")
        schema = (await http.get("/openapi.json")).json()
    await client.close()

    assert response.status_code == 404
    assert "securitySchemes" not in schema.get("components", {})
