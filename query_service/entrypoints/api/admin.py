"""The admin API: read models' generations and rebuild progress, and starting a rebuild."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Body, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from query_service.adapters import broker as amqp
from query_service.entrypoints.api.dependencies import Catalog
from query_service.entrypoints.api.errors import ErrorDetail, Refusal
from query_service.entrypoints.api.limits import UnavailableError
from query_service.entrypoints.api.probes import BROKER_PROBE_ERRORS, broker_reason
from query_service.entrypoints.api_processes import RebuildNotStartedError, Rebuilds
from query_service.service_layer.catalog import ReadModelCatalog, RebuildConflictError
from query_service.service_layer.rebuild import RebuildPolicy, RebuildProgress
from query_service.settings import QueryServiceSettings

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

admin = APIRouter(prefix="/admin", tags=["admin"])


class RebuildRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    read_models: list[str] = Field(min_length=1, max_length=16, examples=[["accounts"]])


class RebuildStarted(BaseModel):
    rebuild_id: str
    read_models: list[str]
    status_url: str


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
        503: {
            "model": Refusal,
            "description": "`broker_unavailable`, `projector_unavailable`, or as for any route",
        },
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
    runner: Rebuilds = request.app.state.rebuilds
    try:
        rebuild_id = await runner.start(body.read_models)
    except RebuildConflictError as e:
        raise HTTPException(status_code=409, detail=str(e)) from e
    except RebuildNotStartedError as e:
        log.warning("rebuild_not_started", reason="projector_unavailable", error=repr(e))
        raise UnavailableError(
            "projector_unavailable", "the projector did not start the rebuild; try again"
        ) from e
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
    """Runs rebuilds started over HTTP as tasks of this process (the API's, or the projector's
    beside API processes); cancels them on shutdown."""

    def __init__(
        self, catalog: ReadModelCatalog, link: amqp.BrokerLink, settings: QueryServiceSettings
    ) -> None:
        self._catalog = catalog
        self._link = link
        self._settings = settings
        self._tasks: set[asyncio.Task[RebuildProgress]] = set()

    async def start(self, read_models: list[str]) -> str:
        # Imported here: the replay adapter is only needed when a rebuild runs.
        from query_service.adapters.replay_source import AmqpReplaySource
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
