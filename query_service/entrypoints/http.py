"""The HTTP API over the read models (stateless; scale it freely)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import TRANSIENT_ERRORS, Document, create_client
from query_service.views import AccountView, account_detail
from shared.settings import QueryServiceSettings

ACCOUNT_NOT_FOUND = "account not found"
STORE_UNAVAILABLE = "read store unavailable"


class Health(BaseModel):
    """Liveness of the API process."""

    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    """The body of an error response."""

    detail: str


def get_database(request: Request) -> AsyncDatabase[Document]:
    database: AsyncDatabase[Document] = request.app.state.database
    return database


Database = Annotated[AsyncDatabase[Document], Depends(get_database)]

router = APIRouter()


@router.get(
    "/accounts/{account_id}",
    response_model=AccountView,
    responses={404: {"model": ErrorDetail}, 503: {"model": ErrorDetail}},
)
async def get_account(account_id: UUID, database: Database) -> AccountView:
    account = await account_detail(account_id, database=database)
    if account is None:
        raise HTTPException(status_code=404, detail=ACCOUNT_NOT_FOUND)
    return account


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health()


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # A MongoDB outage is the client's cue to retry, not a bug: 503 rather than 500.
    return JSONResponse(status_code=503, content={"detail": STORE_UNAVAILABLE})


def create_app(
    settings: QueryServiceSettings, *, database: AsyncDatabase[Document] | None = None
) -> FastAPI:
    """The API app. Given `database`, the caller owns its client; otherwise the app's lifespan
    opens a MongoDB client from `settings` and closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if database is not None:
            app.state.database = database
            yield
            return
        client = create_client(settings.mongo_url)
        app.state.database = client[settings.mongo_db]
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="cqrs-ledger query API", version="0.1.0", lifespan=lifespan)
    app.include_router(router)
    for error in TRANSIENT_ERRORS:
        app.add_exception_handler(error, _store_unavailable)
    return app
