"""The composition root: builds the clients, projections, consumer and HTTP app from settings.

Nothing here runs at import time; every builder is called inside the running event loop and
everything it opens is closed by the matching `stop`/`close`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from fastapi import FastAPI
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from cqrs_runtime.supervision import Supervisor
from query_service.adapters import broker
from query_service.adapters.mongo import (
    CHECKPOINTS_COLLECTION,
    BufferedCheckpoints,
    MongoCheckpoints,
    WriteCounter,
    create_client,
)
from query_service.domain import QueryDomain, load_query_domains, read_models_of
from query_service.entrypoints.api.app import check_api_routes, create_app
from query_service.entrypoints.api_processes import ProjectorLink
from query_service.entrypoints.event_consumer import (
    DEFAULT_RETRY_POLICY,
    ProjectorConsumer,
    RetryPolicy,
)
from query_service.entrypoints.partitions import PartitionBalancer, PartitionSubscriptions
from query_service.metrics import ProjectorMetrics
from query_service.projections.store import TRANSIENT_ERRORS, Document
from query_service.service_layer.catalog import ReadModelCatalog, build_catalog
from query_service.service_layer.projector import GapPolicy, Projector
from query_service.settings import QueryServiceSettings
from shared.amqp import tolerate_invalid_utf8

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


def gap_policy_of(settings: QueryServiceSettings) -> GapPolicy:
    return GapPolicy(
        attempts=settings.projector_gap_attempts, delay_seconds=settings.projector_gap_delay_seconds
    )


@dataclass
class ProjectorRuntime:
    """A running projector: its AMQP connection and consumer."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    consumer: ProjectorConsumer
    topology: broker.DeclaredTopology
    checkpoints: BufferedCheckpoints
    subscriptions: PartitionSubscriptions
    balancer: PartitionBalancer
    stopped: bool = False

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop consuming, let in-flight messages finish, then close the connection.

        Whatever is still unacked when the channel closes goes back to its queue. Idempotent.
        """
        if self.stopped:
            return
        self.stopped = True
        try:
            await self.balancer.stop()
            await self.consumer.stop(grace_seconds)
            await self.checkpoints.close()
        finally:
            await self.connection.close()
        log.info("projector_stopped")


async def start_projector(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    *,
    catalog: ReadModelCatalog | None = None,
    gap_policy: GapPolicy | None = None,
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    metrics: ProjectorMetrics | None = None,
    supervisor: Supervisor | None = None,
) -> ProjectorRuntime:
    """Declare the topology and start consuming every partition queue.

    The projector's loops (the checkpoint writer, the partition balancer) run under
    `supervisor`, and its partition consumers report into it.
    """
    tolerate_invalid_utf8()
    supervisor = supervisor if supervisor is not None else Supervisor()
    if catalog is None:
        domains = load_query_domains(settings.domain_names)
        catalog = build_catalog(database, read_models_of(domains))
    await catalog.ensure_current_indexes()
    checkpoints = BufferedCheckpoints(
        MongoCheckpoints(database[CHECKPOINTS_COLLECTION]), supervisor=supervisor
    )
    handler = Projector(
        catalog,
        checkpoints=checkpoints,
        gap_policy=gap_policy if gap_policy is not None else gap_policy_of(settings),
    )
    connection = await broker.connect(settings.amqp_url)
    try:
        # Publisher confirms (aio-pika's default) make parking safe to ack after.
        channel = await connection.channel()
        wanted = broker.ProjectorTopology(
            settings.projector_partitions,
            parked=broker.parked_bounds(settings.parked_max_messages, settings.parked_max_bytes),
        )
        topology = await broker.declare_projector_topology(channel, wanted)
        consumer = ProjectorConsumer(
            handler=handler,
            batch_handler=handler.project_batch,
            # A batch is what the channel holds unacked at most.
            batch_size=min(settings.projector_batch_size, settings.prefetch),
            parker=broker.AmqpParker(topology.parked_exchange),
            retry_policy=retry_policy,
            metrics=metrics,
            supervisor=supervisor,
            park_retry_seconds=settings.parked_retry_seconds,
        )
        subscriptions = PartitionSubscriptions(
            connection, consumer, wanted, prefetch=settings.prefetch
        )
        await subscriptions.start()
        balancer = PartitionBalancer(
            connection,
            subscriptions,
            consumer,
            interval=settings.projector_rebalance_seconds,
            supervisor=supervisor,
        )
        balancer.start()
    except BaseException:
        await connection.close()
        raise
    log.info(
        "projector_started",
        partitions=settings.projector_partitions,
        prefetch=settings.prefetch,
        read_models=list(catalog.models),
    )
    return ProjectorRuntime(
        connection, channel, consumer, topology, checkpoints, subscriptions, balancer
    )


@dataclass
class QueryService:
    """Everything `python -m query_service` runs, built from settings."""

    settings: QueryServiceSettings
    mongo: AsyncMongoClient[Document]
    catalog: ReadModelCatalog
    projector: ProjectorRuntime | None
    app: FastAPI | None
    supervisor: Supervisor
    metrics: ProjectorMetrics | None = None

    async def stop_projector(self, grace_seconds: float = 10.0) -> None:
        if self.projector is not None:
            projector, self.projector = self.projector, None
            await projector.stop(grace_seconds)

    async def close(self) -> None:
        """Stop the projector if still running and every supervised task, then close the
        MongoDB client."""
        try:
            await self.stop_projector()
            await self.supervisor.stop_all()
        finally:
            await self.mongo.close()


async def bootstrap(
    settings: QueryServiceSettings,
    *,
    domains: Sequence[QueryDomain] | None = None,
    supervisor: Supervisor | None = None,
    projector_link: ProjectorLink | None = None,
) -> QueryService:
    """Build the service over `domains` (by default the ones `CQRS_DOMAINS` names): one MongoDB
    client shared by the projector and the API, and one supervisor for every long-lived task
    of both. A clash between two domains stops it here. `projector_link`: this process serves
    the API beside a projector in its parent process (`entrypoints/api_processes.py`)."""
    if domains is None:
        domains = load_query_domains(settings.domain_names)
    read_models = read_models_of(domains)
    if settings.run_api:
        check_api_routes(domains)  # here, before anything connects
    tolerate_invalid_utf8()
    supervisor = supervisor if supervisor is not None else Supervisor()
    supervisor.transient = TRANSIENT_ERRORS
    metrics = ProjectorMetrics() if settings.run_projector else None
    mongo = create_client(
        settings.mongo_url, listeners=[WriteCounter(metrics.writes)] if metrics else []
    )
    database = mongo[settings.mongo_db]
    catalog = build_catalog(database, read_models)
    try:
        projector = (
            await start_projector(
                settings, database, catalog=catalog, metrics=metrics, supervisor=supervisor
            )
            if settings.run_projector
            else None
        )
    except BaseException:
        await mongo.close()
        raise
    app = (
        create_app(
            settings,
            domains=domains,
            catalog=catalog,
            metrics=metrics,
            supervisor=supervisor,
            projector_link=projector_link,
        )
        if settings.run_api
        else None
    )
    return QueryService(
        settings=settings,
        mongo=mongo,
        catalog=catalog,
        projector=projector,
        app=app,
        supervisor=supervisor,
        metrics=metrics,
    )
