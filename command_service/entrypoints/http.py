"""The command service's operational HTTP endpoint: /healthz, /readyz, /status and /metrics.

The command service takes its work over AMQP; this small app is for orchestrators, Prometheus
and operators. uvicorn serves it inside the service's own event loop, on a socket bound before
the service reports itself started (`CQRS_HTTP_PORT=0` picks a free port: `HttpEndpoint.port`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import structlog
import uvicorn
from aio_pika.abc import AbstractRobustConnection
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from command_service.adapters.partition_leases import PartitionLeases
from command_service.adapters.postgres_event_store import TRANSIENT_ERRORS
from command_service.adapters.relay import RELAY_SUBSCRIPTION
from command_service.adapters.subscription import Subscription
from command_service.entrypoints.commands import CommandConsumer
from command_service.metrics import CommandMetrics
from cqrs_runtime.http_server import server_config
from cqrs_runtime.supervision import Supervisor, mark_healthy

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_SECONDS = 2.0
PROBE_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    *TRANSIENT_ERRORS,
    asyncpg.PostgresError,
)

_RELAY_POSITIONS = """
    SELECT (SELECT last FROM event_position) AS head,
           coalesce((SELECT position FROM checkpoints WHERE name = $1), 0) AS published
"""


def replica_name() -> str:
    """How this replica calls itself in /status: `<hostname>-<pid>`."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Vitals:
    """The running service's parts the endpoints look at."""

    pool: asyncpg.Pool
    connection: AbstractRobustConnection
    leases: PartitionLeases
    consumer: CommandConsumer
    relay: Subscription
    metrics: CommandMetrics
    replica: str
    supervisor: Supervisor


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Any]


class RelayStatus(BaseModel):
    published_position: int | None
    head_position: int | None
    backlog: int | None
    leading: bool
    reason: str | None = Field(
        default=None, description="why the positions are unknown: a reason code"
    )


class Status(BaseModel):
    service: Literal["command"] = "command"
    replica: str
    members: int
    partitions_owned: list[int]
    relay: RelayStatus
    handled: int
    tasks: list[str]
    failing_tasks: list[dict[str, Any]]


router = APIRouter()


def _vitals(request: Request) -> Vitals:
    vitals: Vitals = request.app.state.vitals
    return vitals


async def relay_status(vitals: Vitals) -> RelayStatus:
    """The relay's stored checkpoint against the event store's head (any replica can tell)."""
    leading = vitals.relay.leading
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            row = await vitals.pool.fetchrow(_RELAY_POSITIONS, RELAY_SUBSCRIPTION)
    except PROBE_ERRORS as e:
        reason = postgres_reason(e)
        log.warning("relay_status_unknown", reason=reason, error=repr(e))
        return RelayStatus(
            published_position=None,
            head_position=None,
            backlog=None,
            leading=leading,
            reason=reason,
        )
    assert row is not None
    head, published = int(row["head"] or 0), int(row["published"])
    return RelayStatus(
        published_position=published,
        head_position=head,
        backlog=max(head - published, 0),
        leading=leading,
    )


def postgres_reason(error: BaseException) -> str:
    """A reason code for a failed call to PostgreSQL."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):
        return "unauthorized"
    if isinstance(error, asyncpg.TooManyConnectionsError):
        return "too_many_connections"
    if isinstance(
        error,
        OSError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError,
    ):
        return "unreachable"
    return "error"


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (nothing else is checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    """PostgreSQL answers, the AMQP connection is open and the partition leases are held."""
    vitals = _vitals(request)
    checks: dict[str, Any] = {}
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await vitals.pool.fetchval("SELECT 1")
        checks["postgres"] = {"ok": True}
    except PROBE_ERRORS as e:
        reason = postgres_reason(e)
        # The driver's words may name hosts, roles or internals: the log has them, the
        # (unauthenticated) caller gets the code.
        log.warning("readiness_check_failed", check="postgres", reason=reason, error=repr(e))
        checks["postgres"] = {"ok": False, "reason": reason}
    connection = vitals.connection
    if not connection.is_closed and connection.connected.is_set():
        checks["broker"] = {"ok": True}
    else:
        checks["broker"] = {"ok": False, "reason": "disconnected"}
    leases = vitals.leases
    checks["partitions"] = {"ok": leases.connected, "owned": sorted(leases.owned)}
    if not leases.connected:
        checks["partitions"]["reason"] = "no_lease_connection"
    checks["tasks"] = vitals.supervisor.readiness()
    ready = all(check["ok"] for check in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump(mode="json"))


@router.get("/status", response_model=Status)
async def status(request: Request) -> Status:
    """This replica at a glance: membership, partitions, relay progress, commands handled."""
    vitals = _vitals(request)
    return Status(
        replica=vitals.replica,
        members=vitals.leases.members,
        partitions_owned=sorted(vitals.leases.owned),
        relay=await relay_status(vitals),
        handled=vitals.consumer.handled,
        tasks=vitals.supervisor.running(),
        failing_tasks=vitals.supervisor.readiness()["failing"],
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics; the relay backlog and owned partitions are measured now."""
    vitals = _vitals(request)
    prometheus = vitals.metrics
    relay = await relay_status(vitals)
    prometheus.relay_backlog_events.set(math.nan if relay.backlog is None else relay.backlog)
    prometheus.partitions_owned.set(len(vitals.leases.owned))
    return Response(prometheus.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(vitals: Vitals) -> FastAPI:
    app = FastAPI(title="cqrs-ledger command service", docs_url=None, redoc_url=None)
    app.state.vitals = vitals
    app.include_router(router)
    return app


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the service's own shutdown sequence owns those."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


HTTP_TASK = "http-endpoint"


@dataclass
class HttpEndpoint:
    """The running HTTP server, supervised: a server that fails is replaced by a new one on the
    same socket. `port` is the port actually bound."""

    app: FastAPI
    listener: socket.socket
    host: str
    port: int
    supervisor: Supervisor
    header_timeout: float
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None

    def _ask_to_exit(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    async def run(self) -> None:
        self.server = server = _Server(
            server_config(self.app, header_timeout=self.header_timeout, lifespan="off")
        )
        serving = asyncio.ensure_future(server.serve(sockets=[self.listener]))
        try:
            while not (server.started or serving.done()):
                await asyncio.sleep(0.05)
            if server.started:
                mark_healthy()
            await serving
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    async def stop(self, timeout: float = 5.0) -> None:
        await self.supervisor.stop(HTTP_TASK, timeout=timeout, ask=self._ask_to_exit)
        self.listener.close()


async def serve(
    app: FastAPI,
    host: str,
    port: int,
    *,
    header_timeout: float,
    supervisor: Supervisor | None = None,
) -> HttpEndpoint:
    """Bind `host`:`port` (0: any free port) and serve `app` on it from this event loop.

    A connection that has not sent a request head within `header_timeout` seconds is closed.
    """
    loop = asyncio.get_running_loop()
    family = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0][0]
    listener = socket.create_server((host, port), family=family)
    bound = int(listener.getsockname()[1])
    supervisor = supervisor if supervisor is not None else Supervisor()
    endpoint = HttpEndpoint(app, listener, host, bound, supervisor, header_timeout)
    endpoint.task = supervisor.spawn(HTTP_TASK, endpoint.run, restart_on_return=True).task
    try:
        async with asyncio.timeout(10):
            while endpoint.server is None or not endpoint.server.started:
                if endpoint.task.done():
                    endpoint.task.result()  # raises what stopped it
                    raise RuntimeError("the HTTP endpoint stopped while starting")
                await asyncio.sleep(0.01)
    except BaseException:
        await endpoint.stop(timeout=1.0)
        raise
    log.info("http_endpoint_started", host=host, port=bound)
    return endpoint
