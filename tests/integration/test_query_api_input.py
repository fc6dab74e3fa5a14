"""Hostile and malformed query input: every parameter is validated, none reaches MongoDB as an
operator, and the answer is a 422 that names the parameter (or a 404), never data."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any
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

ACCOUNT = uuid4()


@pytest.fixture(scope="module")
def account_id() -> str:
    return str(ACCOUNT)


@pytest.fixture
async def api(services: Services, mongo_db: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API over a database with one account of owner `alice`: data an injection could leak."""
    settings = QueryServiceSettings(
        mongo_url=services.mongo_url, mongo_db=mongo_db, read_wait_seconds=0.2
    )
    client = create_client(settings.mongo_url)
    database: AsyncDatabase[Document] = client[mongo_db]
    await replay_one_by_one(database, opened_account(ACCOUNT, owner_id="alice", deposit=10))
    app = create_app(settings, database=database)
    async with served(app) as http:
        yield http
    await client.close()


def cursor_of(payload: Any) -> str:
    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# (path, query, parameter the 422 names)
OPERATOR_INJECTIONS = [
    ("/accounts", "owner_id[$ne]=nobody", "owner_id[$ne]"),
    ("/accounts", "owner_id=%7B%22%24ne%22%3A%20null%7D", "owner_id"),  # {"$ne": null}
    ("/accounts", "owner_id=%24ne", "owner_id"),
    ("/accounts", "owner_id[]=alice", "owner_id[]"),
    ("/accounts", "status[$in]=open", "status[$in]"),
    ("/accounts", "status=%7B%22%24exists%22%3Atrue%7D", "status"),
    ("/accounts", "currency=%7B%22%24gt%22%3A%22%22%7D", "currency"),
    ("/accounts", "currency[$regex]=.*", "currency[$regex]"),
    ("/accounts", "$where=1", "$where"),
    ("/accounts", "cursor=" + cursor_of({"after": {"$gt": ""}}), "cursor"),
    ("/accounts", "cursor=" + cursor_of({"after": str(uuid4()), "$where": "1"}), "cursor"),
    ("/accounts", "cursor=" + cursor_of({"$gt": ""}), "cursor"),
    ("/accounts/{account}/transactions", "cursor=" + cursor_of({"before": {"$gt": 0}}), "cursor"),
    ("/accounts/{account}", "min_version[$gt]=0", "min_version[$gt]"),
    ("/accounts/{account}", "min_version=%7B%22%24gt%22%3A0%7D", "min_version"),
    ("/owners/%7B%22%24ne%22%3Anull%7D/summary", "", "owner_id"),  # {"$ne":null}
    ("/owners/%24ne/summary", "", "owner_id"),
    ("/owners/alice/summary", "account_id[$ne]=x", "account_id[$ne]"),
    ("/owners/alice/summary", "cursor=" + cursor_of({"after": {"$gt": ""}}), "cursor"),
    ("/owners/alice/summary", "limit[$gt]=1", "limit[$gt]"),
    ("/accounts/%7B%22%24gt%22%3A%22%22%7D", "", "account_id"),
    ("/transfers/%24where", "", "transfer_id"),
]


@pytest.mark.parametrize(("path", "query", "parameter"), OPERATOR_INJECTIONS)
async def test_an_operator_in_a_parameter_is_refused(
    api: httpx.AsyncClient, account_id: str, path: str, query: str, parameter: str
) -> None:
    response = await api.get(path.format(account=account_id) + (f"?{query}" if query else ""))

    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(problem["loc"][-1] == parameter for problem in problems), problems
    assert all(problem["msg"] for problem in problems)
    assert "balance" not in response.text  # no account data came back


BAD_INPUT = [
    ("/accounts", "limit=0", "limit"),
    ("/accounts", "limit=201", "limit"),
    ("/accounts", "limit=ten", "limit"),
    ("/accounts", "limit=1e3", "limit"),
    ("/accounts", "status=deleted", "status"),
    ("/accounts", "currency=eur", "currency"),
    ("/accounts", "currency=XXX", "currency"),
    ("/accounts", "owner_id=" + "a" * 65, "owner_id"),
    ("/accounts", "owner_id=-leading-dash", "owner_id"),
    ("/accounts", "cursor=not*base64", "cursor"),
    ("/accounts", "cursor=" + "A" * 600, "cursor"),
    ("/accounts", "cursor=Zm9v", "cursor"),  # base64 of "foo"
    ("/accounts/{account}/transactions", "limit=-1", "limit"),
    ("/owners/alice/summary", "limit=0", "limit"),
    ("/owners/alice/summary", "limit=201", "limit"),
    ("/owners/alice/summary", "cursor=Zm9v", "cursor"),
    ("/accounts/{account}/transactions", "cursor=" + cursor_of({"before": 1}), "cursor"),
    ("/accounts/{account}", "min_version=0", "min_version"),
    ("/accounts/{account}", "min_version=-3", "min_version"),
    ("/accounts/{account}", "min_position=99999999999999999999999", "min_position"),
    ("/accounts/{account}", "wait=10", "wait"),
    ("/accounts/not-a-uuid", "", "account_id"),
    ("/transfers/12345", "", "transfer_id"),
]


@pytest.mark.parametrize(("path", "query", "parameter"), BAD_INPUT)
async def test_bad_input_is_422_naming_the_parameter(
    api: httpx.AsyncClient, account_id: str, path: str, query: str, parameter: str
) -> None:
    response = await api.get(path.format(account=account_id) + (f"?{query}" if query else ""))

    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(problem["loc"][-1] == parameter for problem in problems), problems


async def test_valid_input_still_finds_the_data(api: httpx.AsyncClient, account_id: str) -> None:
    listed = await api.get("/accounts", params={"owner_id": "alice", "currency": "EUR"})
    summary = await api.get("/owners/alice/summary")
    unknown_owner = await api.get("/owners/alice.smith@example/summary")

    assert [item["id"] for item in listed.json()["items"]] == [account_id]
    assert summary.status_code == 200
    assert unknown_owner.status_code == 404


async def test_openapi_documents_every_endpoint(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]

    assert {
        "/accounts",
        "/accounts/{account_id}",
        "/accounts/{account_id}/transactions",
        "/owners/{owner_id}/summary",
        "/transfers/{transfer_id}",
        "/healthz",
        "/readyz",
        "/admin/rebuilds",
        "/admin/read-models",
    } <= set(paths)
    assert (await api.get("/docs")).status_code == 200
