"""The HTTP API over the read models (stateless; scale it freely). OpenAPI at /docs.

Every query parameter is declared in a model that forbids unknown ones and gives each a type
(UUID, constrained string, bounded integer, enum), so bad input is a 422 naming the parameter
and nothing a client sends reaches MongoDB as anything but a plain value.

Read-your-writes: a command's reply carries the aggregate's `version` and the event's global
`position`. `?min_version=` (and `?min_position=`) make a read wait, up to
`CQRS_READ_WAIT_SECONDS`, until the document reflects at least that version (position) of its
aggregate; when it does not in time the answer is 504 with `Retry-After`, never stale data.
At most `CQRS_READ_WAIT_MAX_WAITERS` reads wait at once; one more is a 503 at once.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import structlog
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    AMQPConnectionError,
    AuthenticationError,
    ChannelNotFoundEntity,
    ConnectionClosed,
    ProbableAuthenticationError,
)
from aiormq.exceptions import ChannelAccessRefused
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
)
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_service.adapters import broker as amqp
from query_service.adapters.mongo import (
    CHECKPOINTS_COLLECTION,
    TRANSIENT_ERRORS,
    Document,
    MongoCheckpoints,
    create_client,
)
from query_service.adapters.read_models import ReadModelCatalog, RebuildConflictError
from query_service.entrypoints.limits import (
    BodyLimit,
    InFlightLimit,
    ReadWaits,
    RequestTimeout,
    UnavailableError,
)
from query_service.metrics import UNMATCHED_ROUTE, ProjectorMetrics, QueryMetrics
from query_service.projections.ledger import build_catalog
from query_service.service_layer.rebuild import RebuildPolicy, RebuildProgress
from query_service.views import (
    AccountPage,
    AccountsCursor,
    AccountStatus,
    AccountView,
    InvalidCursorError,
    OwnerSummaryView,
    TransactionPage,
    TransactionsCursor,
    TransferView,
    account_detail,
    account_transactions,
    decode_cursor,
    list_accounts,
    owner_account_version,
    owner_summary,
    transaction_head,
    transfer_status,
)
from shared.ledger import Currency, OwnerId
from shared.settings import QueryServiceSettings
from shared.supervision import Supervisor
from shared.topology import PROJECTOR_PARKED_QUEUE, projector_partition_queue

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

T = TypeVar("T")

ACCOUNT_NOT_FOUND = "account not found"
OWNER_NOT_FOUND = "owner not found"
TRANSFER_NOT_FOUND = "transfer not found"
STORE_UNAVAILABLE = "read store unavailable"
MAX_PAGE = 200
DEFAULT_PAGE = 50
MAX_COUNTER = 2**62
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,512}$"
PROBE_TIMEOUT_SECONDS = 2.0
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# --- parameters ------------------------------------------------------------------------------


class Params(BaseModel):
    """Query parameters: unknown ones are refused, so a typo never silently widens a query."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Freshness(Params):
    min_version: int | None = Field(
        default=None, ge=1, le=MAX_COUNTER, description="wait until the aggregate has this version"
    )
    min_position: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COUNTER,
        description="wait until the document reflects an event of its aggregate at or after "
        "this global position",
    )

    @property
    def wanted(self) -> bool:
        return self.min_version is not None or self.min_position is not None

    def met_by(self, version: int, position: int) -> bool:
        return (self.min_version is None or version >= self.min_version) and (
            self.min_position is None or position >= self.min_position
        )


class AccountListParams(Params):
    owner_id: OwnerId | None = None
    status: AccountStatus | None = None
    currency: Currency | None = None
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, pattern=CURSOR_PATTERN)


class TransactionParams(Freshness):
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, pattern=CURSOR_PATTERN)


class SummaryParams(Freshness):
    account_id: UUID | None = Field(
        default=None, description="the account `min_version` / `min_position` refer to"
    )
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="accounts per page")
    cursor: str | None = Field(default=None, pattern=CURSOR_PATTERN)


# --- responses -------------------------------------------------------------------------------


class Health(BaseModel):
    """Liveness of the API process."""

    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    """The body of an error response."""

    detail: str


class Refusal(BaseModel):
    """The body of a refusal the client may retry (503, with `Retry-After`) or must change (413).

    `reason` is a code a client can act on; `detail` says it in words.
    """

    detail: str
    reason: str


class NotCaughtUp(BaseModel):
    """504: the read model has not reached what the query asked for within the wait."""

    detail: str
    required: dict[str, int | None]
    current: dict[str, int | None] | None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Any]
    detail: dict[str, Any]


class RebuildRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    read_models: list[str] = Field(min_length=1, max_length=16, examples=[["accounts"]])


class RebuildStarted(BaseModel):
    rebuild_id: str
    read_models: list[str]
    status_url: str


class NotCaughtUpError(Exception):
    def __init__(self, what: str, wanted: Freshness, current: dict[str, int | None] | None) -> None:
        super().__init__(what)
        self.what = what
        self.wanted = wanted
        self.current = current


# --- dependencies ----------------------------------------------------------------------------


def get_catalog(request: Request) -> ReadModelCatalog:
    catalog: ReadModelCatalog = request.app.state.catalog
    return catalog


def get_settings(request: Request) -> QueryServiceSettings:
    settings: QueryServiceSettings = request.app.state.settings
    return settings


def get_read_waits(request: Request) -> ReadWaits:
    waits: ReadWaits = request.app.state.read_waits
    return waits


Catalog = Annotated[ReadModelCatalog, Depends(get_catalog)]
Settings = Annotated[QueryServiceSettings, Depends(get_settings)]
Waits = Annotated[ReadWaits, Depends(get_read_waits)]

UNAUTHORIZED = "missing or wrong bearer token"
bearer = HTTPBearer(
    auto_error=False, description="`CQRS_API_TOKEN`: `Authorization: Bearer <token>`"
)


def require_token(token: SecretStr) -> Callable[..., Awaitable[None]]:
    """A dependency that refuses a request without `Authorization: Bearer <token>` (401)."""
    expected = token.get_secret_value().encode()

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        # Constant time, so the answer's timing tells nothing about the token.
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                status_code=401, detail=UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"}
            )

    return check


async def wait_for(
    read: Callable[[], Awaitable[T]],
    ready: Callable[[T], bool],
    *,
    timeout: float,
    waits: ReadWaits,
) -> tuple[T, bool]:
    """Read until `ready` holds or `timeout` passed; returns the last value read and whether.

    A read that has to wait takes one of the `waits` slots (`TooManyWaitingReadsError` when
    none is free); one whose version is there at the first read needs none.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = await read()
    if ready(value):
        return value, True
    if loop.time() >= deadline:
        return value, False
    with waits.slot():
        delay = 0.01
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return value, False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)
            value = await read()
            if ready(value):
                return value, True


def _cursor(token: str | None, model: type[Any]) -> Any:
    if token is None:
        return None
    try:
        return decode_cursor(token, model)
    except InvalidCursorError as e:
        raise HTTPException(
            status_code=422,
            detail=[{"loc": ["query", "cursor"], "msg": str(e), "type": "value_error"}],
        ) from e


def _versioned(view: AccountView | TransferView | None) -> dict[str, int | None] | None:
    if view is None:
        return None
    return {"version": view.version, "last_position": view.last_position}


def _reached(document: dict[str, Any] | None) -> dict[str, int | None] | None:
    if document is None:
        return None
    return {"version": int(document["version"]), "last_position": int(document["last_position"])}


router = APIRouter()
admin = APIRouter(prefix="/admin", tags=["admin"])
# Liveness, readiness and metrics: open even when the API requires a token.
probes = APIRouter()

Responses = dict[int | str, dict[str, Any]]
UNAVAILABLE: Responses = {
    503: {
        "model": Refusal,
        "description": "try again after `Retry-After`: `store_unavailable`, `overloaded`, "
        "`request_timeout`, `too_many_waiting_reads`",
    }
}
NOT_FOUND: Responses = {404: {"model": ErrorDetail}, **UNAVAILABLE}
FRESHNESS: Responses = {**NOT_FOUND, 504: {"model": NotCaughtUp}}
# Any driver error: a probe reports it as a reason, never as a 500.
MONGO_PROBE_ERRORS: tuple[type[Exception], ...] = (TimeoutError, PyMongoError)
# Unauthorized, AuthenticationFailed.
MONGO_AUTH_CODES = frozenset({13, 18})
BROKER_PROBE_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *CONNECTION_EXCEPTIONS)


@router.get("/accounts/{account_id}", response_model=AccountView, responses=FRESHNESS)
async def get_account(
    account_id: UUID,
    params: Annotated[Freshness, Query()],
    catalog: Catalog,
    settings: Settings,
    waits: Waits,
) -> AccountView:
    """One account. With `min_version`/`min_position`, waits for the projection to get there."""

    async def read() -> AccountView | None:
        return await account_detail(account_id, catalog=catalog)

    if not params.wanted:
        account = await read()
    else:
        account, ready = await wait_for(
            read,
            lambda found: found is not None and params.met_by(found.version, found.last_position),
            timeout=settings.read_wait_seconds,
            waits=waits,
        )
        if not ready:
            raise NotCaughtUpError(f"account {account_id}", params, _versioned(account))
    if account is None:
        raise HTTPException(status_code=404, detail=ACCOUNT_NOT_FOUND)
    return account


@router.get("/accounts", response_model=AccountPage, responses=UNAVAILABLE)
async def get_accounts(
    params: Annotated[AccountListParams, Query()], catalog: Catalog
) -> AccountPage:
    """Accounts filtered by owner, status and currency, in account-id order, page by page."""
    return await list_accounts(
        catalog=catalog,
        owner_id=params.owner_id,
        status=params.status,
        currency=params.currency,
        limit=params.limit,
        cursor=_cursor(params.cursor, AccountsCursor),
    )


@router.get(
    "/accounts/{account_id}/transactions", response_model=TransactionPage, responses=FRESHNESS
)
async def get_transactions(
    account_id: UUID,
    params: Annotated[TransactionParams, Query()],
    catalog: Catalog,
    settings: Settings,
    waits: Waits,
) -> TransactionPage:
    """The account's deposits, withdrawals and transfer legs, newest first, page by page."""
    cursor = _cursor(params.cursor, TransactionsCursor)

    async def read() -> Any:
        return await transaction_head(account_id, catalog=catalog)

    if not params.wanted:
        head = await read()
    else:
        head, ready = await wait_for(
            read,
            lambda found: (
                found is not None
                and params.met_by(int(found["version"]), int(found["last_position"]))
            ),
            timeout=settings.read_wait_seconds,
            waits=waits,
        )
        if not ready:
            raise NotCaughtUpError(f"transactions of account {account_id}", params, _reached(head))
    if head is None:
        raise HTTPException(status_code=404, detail=ACCOUNT_NOT_FOUND)
    return await account_transactions(
        account_id, catalog=catalog, head=head, limit=params.limit, cursor=cursor
    )


@router.get(
    "/owners/{owner_id}/summary",
    response_model=OwnerSummaryView,
    responses=FRESHNESS,
)
async def get_owner_summary(
    owner_id: OwnerId,
    params: Annotated[SummaryParams, Query()],
    catalog: Catalog,
    settings: Settings,
    waits: Waits,
) -> OwnerSummaryView:
    """An owner's accounts, page by page, and its total balance per currency.

    `accounts` is one page in account-id order (pass `next_cursor` back as `cursor`); `totals`
    always covers all the owner's accounts. The summary spans several accounts, which are
    projected independently; to read your write, name the account the command touched:
    `?account_id=<id>&min_version=<version>`.
    """
    cursor = _cursor(params.cursor, AccountsCursor)
    if params.wanted:
        if params.account_id is None:
            raise HTTPException(
                status_code=422,
                detail=[
                    {
                        "loc": ["query", "account_id"],
                        "msg": "min_version / min_position on a summary need the account_id "
                        "they refer to: the summary spans accounts projected independently",
                        "type": "missing",
                    }
                ],
            )
        account_id = params.account_id

        async def read() -> dict[str, Any] | None:
            return await owner_account_version(owner_id, account_id, catalog=catalog)

        entry, caught_up = await wait_for(
            read,
            lambda found: (
                found is not None
                and params.met_by(int(found["version"]), int(found["last_position"]))
            ),
            timeout=settings.read_wait_seconds,
            waits=waits,
        )
        if not caught_up:
            raise NotCaughtUpError(
                f"summary of owner {owner_id} (account {account_id})", params, _reached(entry)
            )
    summary = await owner_summary(owner_id, catalog=catalog, limit=params.limit, cursor=cursor)
    if summary is None:
        raise HTTPException(status_code=404, detail=OWNER_NOT_FOUND)
    return summary


@router.get("/transfers/{transfer_id}", response_model=TransferView, responses=FRESHNESS)
async def get_transfer(
    transfer_id: UUID,
    params: Annotated[Freshness, Query()],
    catalog: Catalog,
    settings: Settings,
    waits: Waits,
) -> TransferView:
    """A transfer's status: pending, completed or failed (with the reason)."""

    async def read() -> TransferView | None:
        return await transfer_status(transfer_id, catalog=catalog)

    if not params.wanted:
        transfer = await read()
    else:
        transfer, ready = await wait_for(
            read,
            lambda found: found is not None and params.met_by(found.version, found.last_position),
            timeout=settings.read_wait_seconds,
            waits=waits,
        )
        if not ready:
            raise NotCaughtUpError(f"transfer {transfer_id}", params, _versioned(transfer))
    if transfer is None:
        raise HTTPException(status_code=404, detail=TRANSFER_NOT_FOUND)
    return transfer


@probes.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (nothing else is checked)."""
    return Health()


@probes.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request, catalog: Catalog, settings: Settings) -> JSONResponse:
    """MongoDB and RabbitMQ answer, and the projection lag is under `CQRS_READYZ_MAX_LAG`."""
    checks: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await catalog.database.command("ping")
            detail["checkpoints"] = await MongoCheckpoints(
                catalog.database[CHECKPOINTS_COLLECTION]
            ).all()
            detail["read_models"] = {
                name: {"current": state.current, "target": state.target}
                for name, state in (await catalog.states()).items()
            }
        checks["mongo"] = {"ok": True}
    except MONGO_PROBE_ERRORS as e:
        checks["mongo"] = _failed("mongo", mongo_reason(e), e)
    partitions = _partition_queues(settings)
    try:
        depths = await _queue_depths(request, [*partitions, PROJECTOR_PARKED_QUEUE])
        checks["broker"] = {"ok": True}
        lag = sum(depths[name] for name in partitions)
        _prometheus(request).projection_lag_events.set(lag)
        checks["lag"] = {
            "ok": lag <= settings.readyz_max_lag,
            "events": lag,
            "max": settings.readyz_max_lag,
            "partitions": {name: depths[name] for name in partitions},
        }
        if lag > settings.readyz_max_lag:
            checks["lag"]["reason"] = "lag_above_max"
        detail["parked"] = {"queue": depths[PROJECTOR_PARKED_QUEUE]}
    except BROKER_PROBE_ERRORS as e:
        checks["broker"] = _failed("broker", broker_reason(e), e)
        checks["lag"] = {"ok": False, "reason": "unknown_without_broker"}
        detail["parked"] = {}
    metrics: ProjectorMetrics | None = request.app.state.metrics
    if metrics is not None:
        detail["parked"]["this_process"] = metrics.parked
        detail["parked"]["last_reason"] = metrics.last_parked_reason
        detail["projector"] = {
            "projected": metrics.projected,
            "duplicates": metrics.duplicates,
            "requeued": metrics.requeued,
        }
    checks["tasks"] = request.app.state.supervisor.readiness()
    ready = all(check.get("ok") for check in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks, detail=detail)
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump(mode="json"))


def _failed(check: str, reason: str, error: BaseException) -> dict[str, Any]:
    # The client (an orchestrator, anyone who can reach the port) gets the reason code; the
    # driver's words, which may name hosts, users or internals, go to the log.
    log.warning("readiness_check_failed", check=check, reason=reason, error=repr(error))
    return {"ok": False, "reason": reason}


def mongo_reason(error: BaseException) -> str:
    """A reason code for a failed call to MongoDB."""
    if isinstance(error, TimeoutError | NetworkTimeout | ExecutionTimeout):
        return "timeout"
    if isinstance(error, ConnectionFailure):
        return "unreachable"
    if isinstance(error, OperationFailure) and error.code in MONGO_AUTH_CODES:
        return "unauthorized"
    return "error"


def broker_reason(error: BaseException) -> str:
    """A reason code for a failed call to RabbitMQ."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, AuthenticationError | ProbableAuthenticationError | ChannelAccessRefused):
        return "unauthorized"
    if isinstance(error, ChannelNotFoundEntity):
        # The projector declares its queues when it starts; none has started yet.
        return "queues_missing"
    if isinstance(error, ConnectionClosed | RuntimeError):
        # aio-pika's word for an operation on a connection that is down (and reconnecting).
        return "disconnected"
    if isinstance(error, OSError | AMQPConnectionError):
        return "unreachable"
    return "error"


@probes.get("/metrics", include_in_schema=False)
async def metrics(request: Request, settings: Settings) -> Response:
    """Prometheus metrics; the projection lag in events is measured now, from the broker."""
    prometheus = _prometheus(request)
    try:
        depths = await _queue_depths(request, _partition_queues(settings))
        prometheus.projection_lag_events.set(sum(depths.values()))
    except BROKER_PROBE_ERRORS as e:
        # Unknown is not zero: a dashboard shows a gap rather than a healthy-looking lag.
        prometheus.projection_lag_events.set(math.nan)
        log.debug("metrics_lag_unknown", error=repr(e))
    return Response(prometheus.render(), media_type=CONTENT_TYPE_LATEST)


def _partition_queues(settings: QueryServiceSettings) -> list[str]:
    return [projector_partition_queue(i) for i in range(settings.projector_partitions)]


async def _queue_depths(request: Request, names: list[str]) -> dict[str, int]:
    """Messages ready in these queues, through the app's broker link, within the probe time."""
    link: amqp.BrokerLink = request.app.state.broker
    async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
        return await amqp.queue_depths(await link.connection(), names)


def _prometheus(request: Request) -> QueryMetrics:
    prometheus: QueryMetrics = request.app.state.prometheus
    return prometheus


class RequestTimer:
    """ASGI middleware: times each HTTP request into `cqrs_http_request_seconds`.

    The `route` label is the matched route's template (`/accounts/{account_id}`), never the raw
    path, so the number of series stays bounded whatever clients send.
    """

    def __init__(self, app: ASGIApp, *, prometheus: QueryMetrics) -> None:
        self._app = app
        self._histogram = prometheus.http_request_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app starts a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_with_status)
        finally:
            route: BaseRoute | None = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self._histogram.labels(method, template, str(status)).observe(
                time.perf_counter() - started
            )


# --- admin -----------------------------------------------------------------------------------


@admin.get("/read-models")
async def get_read_models(catalog: Catalog) -> list[dict[str, Any]]:
    """Each read model's current generation, and its rebuild progress if one ran."""
    return [await _read_model_status(catalog, name) for name in catalog.models]


@admin.get("/read-models/{name}", responses={404: {"model": ErrorDetail}})
async def get_read_model(name: str, catalog: Catalog) -> dict[str, Any]:
    """One read model's generation and rebuild progress (done/total, rate, ETA)."""
    if name not in catalog.models:
        raise HTTPException(status_code=404, detail=f"no read model {name!r}")
    return await _read_model_status(catalog, name)


async def _read_model_status(catalog: ReadModelCatalog, name: str) -> dict[str, Any]:
    document = await catalog.registry.document(name) or {}
    return {
        "name": name,
        "current": document.get("current", 1),
        "target": document.get("target"),
        "previous": document.get("previous"),
        "rebuild": document.get("rebuild"),
    }


@admin.post(
    "/rebuilds",
    status_code=202,
    response_model=RebuildStarted,
    responses={
        400: {"model": ErrorDetail, "description": "the body is not JSON"},
        409: {"model": ErrorDetail},
        413: {"model": Refusal, "description": "`body_too_large`"},
        503: {"model": Refusal, "description": "`broker_unavailable`, or as for any route"},
    },
)
async def post_rebuild(
    request: Request, catalog: Catalog, body: Annotated[RebuildRequest, Body()]
) -> RebuildStarted:
    """Rebuild read models from a replay of the event store, without stopping queries.

    Progress: `GET /admin/read-models/{name}`; the switch happens when the new generation has
    caught up with the live stream.
    """
    unknown = sorted(set(body.read_models) - set(catalog.models))
    if unknown:
        # Shaped like FastAPI's own validation errors, as the OpenAPI document says.
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "loc": ["body", "read_models"],
                    "msg": f"unknown read models {unknown}; known: {sorted(catalog.models)}",
                    "type": "value_error",
                }
            ],
        )
    runner: RebuildRunner = request.app.state.rebuilds
    try:
        rebuild_id = await runner.start(body.read_models)
    except RebuildConflictError as e:
        raise HTTPException(status_code=409, detail=str(e)) from e
    except BROKER_PROBE_ERRORS as e:
        log.warning("rebuild_not_started", reason=broker_reason(e), error=repr(e))
        raise UnavailableError(
            "broker_unavailable", "the broker is unavailable: no rebuild started; try again"
        ) from e
    return RebuildStarted(
        rebuild_id=rebuild_id,
        read_models=body.read_models,
        status_url=f"/admin/read-models/{body.read_models[0]}",
    )


class RebuildRunner:
    """Runs rebuilds started over HTTP as tasks of this process; cancels them on shutdown."""

    def __init__(
        self, catalog: ReadModelCatalog, link: amqp.BrokerLink, settings: QueryServiceSettings
    ) -> None:
        self._catalog = catalog
        self._link = link
        self._settings = settings
        self._tasks: set[asyncio.Task[RebuildProgress]] = set()

    async def start(self, read_models: list[str]) -> str:
        # Imported here: the replay adapter is only needed when a rebuild runs.
        from query_service.adapters.replay import AmqpReplaySource
        from query_service.service_layer.rebuild import Rebuild

        settings = self._settings
        source = AmqpReplaySource(
            await self._link.connection(),
            batch_size=settings.rebuild_batch_size,
            start_timeout=settings.rebuild_start_timeout_seconds,
            idle_timeout=settings.rebuild_idle_timeout_seconds,
        )
        rebuild = Rebuild(
            self._catalog,
            source,
            read_models,
            policy=rebuild_policy(settings),
            owner=f"api@{socket.gethostname()}:{os.getpid()}",
        )
        await rebuild.claim()
        task = asyncio.create_task(rebuild.run(), name=f"rebuild-{rebuild.rebuild_id}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return rebuild.rebuild_id

    def _finished(self, task: asyncio.Task[RebuildProgress]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("rebuild_task_failed", error=repr(task.exception()))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def rebuild_policy(settings: QueryServiceSettings) -> RebuildPolicy:
    return RebuildPolicy(
        max_rounds=settings.rebuild_max_rounds,
        retire_seconds=settings.rebuild_retire_seconds,
    )


# --- app -------------------------------------------------------------------------------------


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # A MongoDB outage is the client's cue to retry, not a bug: 503 rather than 500.
    log.warning("read_store_unavailable", path=request.url.path, error=repr(exc))
    return JSONResponse(
        status_code=503,
        content=Refusal(detail=STORE_UNAVAILABLE, reason="store_unavailable").model_dump(),
        headers={"Retry-After": "1"},
    )


async def _not_caught_up(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotCaughtUpError)
    settings: QueryServiceSettings = request.app.state.settings
    wanted = exc.wanted
    body = NotCaughtUp(
        detail=f"{exc.what} has not reached the requested version/position within "
        f"{settings.read_wait_seconds}s; the projection is behind, retry later",
        required={"min_version": wanted.min_version, "min_position": wanted.min_position},
        current=exc.current,
    )
    return JSONResponse(
        status_code=504, content=body.model_dump(mode="json"), headers={"Retry-After": "1"}
    )


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnavailableError)
    body = Refusal(detail=exc.detail, reason=exc.reason)
    return JSONResponse(status_code=503, content=body.model_dump(), headers={"Retry-After": "1"})


def create_app(
    settings: QueryServiceSettings,
    *,
    database: AsyncDatabase[Document] | None = None,
    catalog: ReadModelCatalog | None = None,
    metrics: ProjectorMetrics | None = None,
    supervisor: Supervisor | None = None,
) -> FastAPI:
    """The API app. Given `database` (or `catalog`), the caller owns its client; otherwise the
    app's lifespan opens a MongoDB client from `settings` and closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.metrics = metrics
        link = amqp.BrokerLink(settings.amqp_url)
        app.state.broker = link
        client = None
        if catalog is not None:
            app.state.catalog = catalog
        elif database is not None:
            app.state.catalog = build_catalog(database)
        else:
            client = create_client(settings.mongo_url)
            app.state.catalog = build_catalog(client[settings.mongo_db])
        runner = RebuildRunner(app.state.catalog, link, settings)
        app.state.rebuilds = runner
        try:
            yield
        finally:
            await runner.close()
            await link.close()
            if client is not None:
                await client.close()

    app = FastAPI(title="cqrs-ledger query API", version="0.2.0", lifespan=lifespan)
    supervisor = supervisor if supervisor is not None else Supervisor()
    app.state.supervisor = supervisor
    prometheus = QueryMetrics(projector=metrics, supervisor=supervisor)
    app.state.prometheus = prometheus
    app.state.read_waits = ReadWaits(settings.read_wait_max_waiters, prometheus=prometheus)
    # Each one added wraps the ones before: the last is the outermost.
    app.add_middleware(
        RequestTimeout, seconds=settings.http_request_timeout_seconds, prometheus=prometheus
    )
    app.add_middleware(InFlightLimit, limit=settings.http_max_concurrency, prometheus=prometheus)
    # Before any route, token check or body parser runs.
    app.add_middleware(BodyLimit, max_bytes=settings.http_max_body_bytes, prometheus=prometheus)
    # Outermost: every answer is timed, the refusals of the limits too.
    app.add_middleware(RequestTimer, prometheus=prometheus)
    app.include_router(probes)
    if settings.api_token is None:
        app.include_router(router)
        app.include_router(admin)
    else:
        # Probes, /metrics and FastAPI's docs are on other routers: orchestrators and scrapers
        # call them without credentials, and they disclose no read-model data.
        protected: dict[str, Any] = {
            "dependencies": [Depends(require_token(settings.api_token))],
            "responses": {401: {"model": ErrorDetail}},
        }
        app.include_router(router, **protected)
        app.include_router(admin, **protected)
    for error in TRANSIENT_ERRORS:
        app.add_exception_handler(error, _store_unavailable)
    app.add_exception_handler(NotCaughtUpError, _not_caught_up)
    # Also `TooManyWaitingReadsError`, one of its kind.
    app.add_exception_handler(UnavailableError, _unavailable)
    return app
