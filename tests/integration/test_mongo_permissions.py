"""Least privilege on MongoDB: the query service's user (readWrite on its database only, as
scripts/docker/mongo/init-users.js creates it) does all the query service does, and the server
refuses it everything else; the read-only user reads and writes nothing.

This needs a server that enforces authorization, which the shared test server does not: the
module starts its own through scripts/mongo-local (MONGO_AUTH=1) on a free port.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from query_service.adapters.mongo import create_client
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.settings import QueryServiceSettings
from tests.query_support import opened_account, served
from tests.read_model_support import ledger_catalog, replay_one_by_one

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parents[2] / "scripts" / "mongo-local"
DATABASE = "cqrs"
OTHER = "someone_else"
UNAUTHORIZED = 13
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"


@dataclass(frozen=True)
class SecuredServer:
    port: int
    passwords: dict[str, str]

    def url(self, user: str | None = None, password: str | None = None) -> str:
        options = "directConnection=true&retryWrites=false"
        if user is None:
            return f"mongodb://127.0.0.1:{self.port}/?{options}"
        secret = password if password is not None else self.passwords[user]
        source = "admin" if user == "root" else DATABASE
        return f"mongodb://{user}:{secret}@127.0.0.1:{self.port}/{DATABASE}?{options}&authSource={source}"


async def mongo_local(command: str, port: int, directory: Path, *, auth: bool) -> None:
    env = {
        **os.environ,
        "MONGO_PORT": str(port),
        "MONGO_DIR": str(directory),
        "MONGO_AUTH": "1" if auth else "",
    }
    run = await asyncio.create_subprocess_exec("bash", str(SCRIPT), command, env=env)
    assert await run.wait() == 0, f"scripts/mongo-local {command} failed"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecuredServer]:
    """A server of this module's own: users created without auth, then restarted with it
    (SecantusDB, like mongod --auth, has no localhost exception to create the first user)."""
    directory = tmp_path_factory.mktemp("mongo-auth")
    port = free_port()
    secured = SecuredServer(
        port, {user: secrets.token_urlsafe(16) for user in ("root", "cqrs_query", "cqrs_reader")}
    )
    await mongo_local("start", port, directory, auth=False)
    try:
        setup: AsyncMongoClient[Document] = AsyncMongoClient(secured.url())
        try:
            await setup.admin.command(
                "createUser", "root", pwd=secured.passwords["root"], roles=["root"]
            )
            # As scripts/docker/mongo/init-users.js does for docker-compose.
            for user, role in (("cqrs_query", "readWrite"), ("cqrs_reader", "read")):
                await setup[DATABASE].command(
                    "createUser",
                    user,
                    pwd=secured.passwords[user],
                    roles=[{"role": role, "db": DATABASE}],
                )
            await setup[OTHER]["secrets"].insert_one({"_id": "k", "value": "not yours"})
        finally:
            await setup.close()
        await mongo_local("stop", port, directory, auth=False)
        await mongo_local("start", port, directory, auth=True)
        yield secured
    finally:
        await mongo_local("stop", port, directory, auth=False)


@pytest.fixture
async def as_query(server: SecuredServer) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(server.url("cqrs_query"))
    yield client[DATABASE]
    await client.close()


@pytest.fixture
async def as_reader(server: SecuredServer) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(server.url("cqrs_reader"))
    yield client[DATABASE]
    await client.close()


async def api_get(settings: QueryServiceSettings, path: str) -> httpx.Response:
    app = create_app(settings)  # the app opens its own client from CQRS_MONGO_URL
    async with served(app) as http:
        return await http.get(path)


async def test_the_query_user_projects_and_serves(
    server: SecuredServer, as_query: AsyncDatabase[Document]
) -> None:
    account = uuid4()
    catalog = ledger_catalog(as_query)
    await catalog.ensure_current_indexes()
    await replay_one_by_one(as_query, opened_account(account, owner_id="alice", deposit=10))
    # A rebuild drops the generation it replaced.
    await as_query["accounts_v0_scratch"].insert_one({"_id": 1})
    await as_query.drop_collection("accounts_v0_scratch")
    settings = QueryServiceSettings(
        amqp_url=NO_BROKER, mongo_url=server.url("cqrs_query"), mongo_db=DATABASE
    )

    detail = await api_get(settings, f"/accounts/{account}")
    ready = await api_get(settings, "/readyz")

    assert detail.status_code == 200 and detail.json()["balance"] == 10
    assert ready.json()["checks"]["mongo"] == {"ok": True}


Action = Callable[[AsyncDatabase[Document]], Awaitable[Any]]
FORBIDDEN: dict[str, Action] = {
    "drop another database": lambda db: db.client.drop_database(OTHER),
    "write another database": lambda db: db.client[OTHER]["secrets"].insert_one({"v": "mine"}),
    "read another database": lambda db: db.client[OTHER]["secrets"].find_one({}),
    "drop another database's collection": lambda db: db.client[OTHER].drop_collection("secrets"),
    "drop its own database": lambda db: db.client.drop_database(DATABASE),
    "list another database's collections": lambda db: db.client[OTHER].list_collection_names(),
    "create a user": lambda db: db.command(
        "createUser", "intruder", pwd="x", roles=[{"role": "readWrite", "db": OTHER}]
    ),
    "grant itself a role": lambda db: db.command(
        "grantRolesToUser", "cqrs_query", roles=[{"role": "dbOwner", "db": DATABASE}]
    ),
    "read the users": lambda db: db.client.admin["system.users"].find_one({}),
}


@pytest.mark.parametrize("action", list(FORBIDDEN))
async def test_the_query_user_is_refused_everything_else(
    server: SecuredServer, as_query: AsyncDatabase[Document], action: str
) -> None:
    with pytest.raises(OperationFailure) as refused:
        await FORBIDDEN[action](as_query)

    assert refused.value.code == UNAUTHORIZED
    root: AsyncMongoClient[Document] = AsyncMongoClient(server.url("root"))
    try:
        assert await root[OTHER]["secrets"].find_one({}) == {"_id": "k", "value": "not yours"}
        assert OTHER in await root.list_database_names()
    finally:
        await root.close()


async def test_the_query_user_sees_no_other_database(
    server: SecuredServer, as_query: AsyncDatabase[Document]
) -> None:
    """Listing databases: SecantusDB refuses it to a user without the privilege; MongoDB answers
    with only the databases the user has privileges on (`authorizedDatabases`). Either way no
    other database's name or size shows."""
    await as_query["listing_scratch"].insert_one({"_id": 1})  # so its own database exists
    refused: OperationFailure | None = None
    try:
        listed = {entry["name"] async for entry in await as_query.client.list_databases()}
        listed |= set(await as_query.client.list_database_names())
    except OperationFailure as e:
        refused = e
    finally:
        await as_query.drop_collection("listing_scratch")

    if refused is not None:
        assert refused.code == UNAUTHORIZED
    else:
        assert listed <= {DATABASE}


async def test_the_reader_reads_and_writes_nothing(
    server: SecuredServer, as_query: AsyncDatabase[Document], as_reader: AsyncDatabase[Document]
) -> None:
    account = uuid4()
    await replay_one_by_one(as_query, opened_account(account, owner_id="bob", deposit=5))
    settings = QueryServiceSettings(
        amqp_url=NO_BROKER, mongo_url=server.url("cqrs_reader"), mongo_db=DATABASE
    )

    detail = await api_get(settings, f"/accounts/{account}")
    with pytest.raises(OperationFailure) as insert:
        await as_reader["accounts_v1"].insert_one({"_id": "forged"})
    with pytest.raises(OperationFailure) as update:
        await as_reader["accounts_v1"].update_one({"id": str(account)}, {"$set": {"balance": 1}})
    with pytest.raises(OperationFailure) as index:
        await as_reader["accounts_v1"].create_index("balance")

    assert detail.status_code == 200 and detail.json()["balance"] == 5
    assert {insert.value.code, update.value.code, index.value.code} == {UNAUTHORIZED}


@pytest.mark.parametrize("password", [None, "wrong"])
async def test_without_the_right_credentials_nothing_is_read(
    server: SecuredServer, password: str | None
) -> None:
    url = server.url() if password is None else server.url("cqrs_query", password)
    client: AsyncMongoClient[Document] = AsyncMongoClient(url, serverSelectionTimeoutMS=3000)
    try:
        with pytest.raises(OperationFailure) as refused:
            await client[DATABASE]["accounts_v1"].find_one({})
    finally:
        await client.close()

    assert refused.value.code in (UNAUTHORIZED, 18)  # 18: AuthenticationFailed
