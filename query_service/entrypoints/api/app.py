"""The API app, built from data: the framework's routers (probes, admin), the domains' routes,
the limits and timing middleware, the token check, and the error handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from pymongo.asynchronous.database import AsyncDatabase

from cqrs_runtime.supervision import Supervisor
from query_service.adapters import broker as amqp
from query_service.adapters.mongo import create_client
from query_service.domain import (
    FRAMEWORK,
    QueryDomain,
    check_routes,
    load_query_domains,
    read_models_of,
)
from query_service.entrypoints.api.admin import RebuildRunner, admin
from query_service.entrypoints.api.auth import require_token
from query_service.entrypoints.api.errors import (
    ErrorDetail,
    NotCaughtUpError,
    not_caught_up,
    store_unavailable,
    unavailable,
)
from query_service.entrypoints.api.limits import (
    BodyLimit,
    InFlightLimit,
    ReadWaits,
    RequestTimeout,
    UnavailableError,
)
from query_service.entrypoints.api.probes import probes
from query_service.entrypoints.api.timing import RequestTimer
from query_service.entrypoints.api_processes import ProjectorLink
from query_service.metrics import ProjectorMetrics, QueryMetrics
from query_service.projections.store import TRANSIENT_ERRORS, Document
from query_service.service_layer.catalog import ReadModelCatalog, build_catalog
from query_service.settings import QueryServiceSettings


def check_api_routes(domains: Sequence[QueryDomain]) -> None:
    """Refuse (`DomainSetupError`) a route of `domains` that clashes with another's or with
    the framework's own."""
    check_routes(
        [
            (FRAMEWORK, probes),
            *((domain.name, domain.routes) for domain in domains if domain.routes is not None),
            (FRAMEWORK, admin),
        ]
    )


def create_app(
    settings: QueryServiceSettings,
    *,
    domains: Sequence[QueryDomain] | None = None,
    database: AsyncDatabase[Document] | None = None,
    catalog: ReadModelCatalog | None = None,
    metrics: ProjectorMetrics | None = None,
    supervisor: Supervisor | None = None,
    projector_link: ProjectorLink | None = None,
) -> FastAPI:
    """The API app over `domains` (by default the ones `CQRS_DOMAINS` names). Given `database`
    (or `catalog`), the caller owns its client; otherwise the app's lifespan opens a MongoDB
    client from `settings` and closes it on shutdown. Given `projector_link` (the API runs in a
    process of its own beside the projector's), `/metrics` and `/readyz` show that projector as
    its reports tell, and `POST /admin/rebuilds` starts the rebuild in that process."""
    if projector_link is not None:
        metrics = projector_link.reports.metrics
    if domains is None:
        domains = load_query_domains(settings.domain_names)
    read_models = read_models_of(domains)
    check_api_routes(domains)

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
            app.state.catalog = build_catalog(database, read_models)
        else:
            client = create_client(settings.mongo_url)
            app.state.catalog = build_catalog(client[settings.mongo_db], read_models)
        runner: RebuildRunner | None = None
        if projector_link is None:
            runner = RebuildRunner(app.state.catalog, link, settings)
            app.state.rebuilds = runner
        else:
            # Beside a projector's process, rebuilds are started there (api_processes.py).
            app.state.rebuilds = projector_link.rebuilds
        try:
            yield
        finally:
            if runner is not None:
                await runner.close()
            await link.close()
            if client is not None:
                await client.close()

    app = FastAPI(title="cqrs query API", version="0.3.0", lifespan=lifespan)
    supervisor = supervisor if supervisor is not None else Supervisor()
    app.state.supervisor = supervisor
    app.state.projector_link = projector_link
    prometheus = QueryMetrics(
        projector=metrics,
        supervisor=supervisor,
        task_failures_elsewhere=(
            None if projector_link is None else lambda: projector_link.reports.failures_total
        ),
    )
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
    # Probes, /metrics and FastAPI's docs are open: orchestrators and scrapers call them
    # without credentials, and they disclose no read-model data.
    app.include_router(probes)
    protected: dict[str, Any] = {}
    if settings.api_token is not None:
        protected = {
            "dependencies": [Depends(require_token(settings.api_token))],
            "responses": {401: {"model": ErrorDetail}},
        }
    for domain in domains:
        if domain.routes is not None:
            app.include_router(domain.routes, **protected)
    app.include_router(admin, **protected)
    for error in TRANSIENT_ERRORS:
        app.add_exception_handler(error, store_unavailable)
    app.add_exception_handler(NotCaughtUpError, not_caught_up)
    # Also `TooManyWaitingReadsError`, one of its kind.
    app.add_exception_handler(UnavailableError, unavailable)
    return app
