"""Liveness, readiness and metrics: open even when the API requires a token.

A failing check names a reason code, never the driver's exception (that goes to the log).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

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
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pymongo.errors import (
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
)

from query_service.adapters import broker as amqp
from query_service.adapters.mongo import CHECKPOINTS_COLLECTION, MongoCheckpoints
from query_service.entrypoints.api.dependencies import Catalog, Settings
from query_service.entrypoints.api_processes import ProjectorLink
from query_service.metrics import ProjectorMetrics, QueryMetrics
from query_service.settings import QueryServiceSettings
from shared.topology import PROJECTOR_PARKED_QUEUE, projector_partition_queue

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

PROBE_TIMEOUT_SECONDS = 2.0
MONGO_PROBE_ERRORS: tuple[type[Exception], ...] = (TimeoutError, PyMongoError)

MONGO_AUTH_CODES = frozenset({13, 18})

BROKER_PROBE_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *CONNECTION_EXCEPTIONS)

probes = APIRouter()


class Health(BaseModel):
    """Liveness of the API process."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Any]
    detail: dict[str, Any]


@probes.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (nothing else is checked)."""
    return Health()


@probes.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request, catalog: Catalog, settings: Settings) -> JSONResponse:
    """MongoDB and RabbitMQ answer, and the projection lag is under `CQRS_READYZ_MAX_LAG`."""
    checks: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    await _refresh_projector_reports(request)
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
    link: ProjectorLink | None = request.app.state.projector_link
    if link is not None:
        # The projector runs in the parent process: its tasks count here as this one's do.
        checks["projector"] = link.reports.readiness()
        if link.reports.failing:
            checks["tasks"] = {
                "ok": False,
                "failing": [*checks["tasks"]["failing"], *link.reports.failing],
            }
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
    await _refresh_projector_reports(request)
    try:
        depths = await _queue_depths(request, _partition_queues(settings))
        prometheus.projection_lag_events.set(sum(depths.values()))
    except BROKER_PROBE_ERRORS as e:
        # Unknown is not zero: a dashboard shows a gap rather than a healthy-looking lag.
        prometheus.projection_lag_events.set(math.nan)
        log.debug("metrics_lag_unknown", error=repr(e))
    return Response(prometheus.render(), media_type=CONTENT_TYPE_LATEST)


async def _refresh_projector_reports(request: Request) -> None:
    link: ProjectorLink | None = request.app.state.projector_link
    if link is not None:
        await link.refresh()


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
