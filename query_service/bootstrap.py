"""The composition root: builds the clients, projections, consumer and HTTP app from settings.

Nothing here runs at import time; every builder is called inside the running event loop and
everything it opens is closed by the matching `stop`/`close`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from fastapi import FastAPI
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters import broker
from query_service.adapters.mongo import (
    ACCOUNTS_COLLECTION,
    CHECKPOINTS_COLLECTION,
    Document,
    MongoCheckpoints,
    VersionedCollection,
    create_client,
)
from query_service.entrypoints.http import create_app
from query_service.entrypoints.projector import (
    DEFAULT_RETRY_POLICY,
    ProjectorConsumer,
    RetryPolicy,
)
from query_service.projections.accounts import AccountsProjection
from query_service.projections.base import Projection
from query_service.service_layer.projector import DEFAULT_GAP_POLICY, GapPolicy, project
from shared.settings import QueryServiceSettings

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


def build_projections(database: AsyncDatabase[Document]) -> list[Projection]:
    """The ledger's projections; add a read model by adding it here."""
    return [AccountsProjection(VersionedCollection(database[ACCOUNTS_COLLECTION]))]


@dataclass
class ProjectorRuntime:
    """A running projector: its AMQP connection and consumer."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    consumer: ProjectorConsumer
    topology: broker.DeclaredTopology
    stopped: bool = False

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop consuming, let in-flight messages finish, then close the connection.

        Whatever is still unacked when the channel closes goes back to its queue. Idempotent.
        """
        if self.stopped:
            return
        self.stopped = True
        try:
            await self.consumer.stop(grace_seconds)
        finally:
            await self.connection.close()
        log.info("projector_stopped")


async def start_projector(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    *,
    projections: Sequence[Projection] | None = None,
    gap_policy: GapPolicy = DEFAULT_GAP_POLICY,
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
) -> ProjectorRuntime:
    """Declare the topology and start consuming every partition queue."""
    chosen = list(projections) if projections is not None else build_projections(database)
    handler = functools.partial(
        project,
        projections=chosen,
        checkpoints=MongoCheckpoints(database[CHECKPOINTS_COLLECTION]),
        gap_policy=gap_policy,
    )
    connection = await broker.connect(settings.amqp_url)
    try:
        # Publisher confirms (aio-pika's default) make parking safe to ack after.
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        topology = await broker.declare_projector_topology(
            channel, broker.ProjectorTopology(settings.projector_partitions)
        )
        consumer = ProjectorConsumer(
            handler=handler,
            parker=broker.AmqpParker(topology.parked_exchange),
            retry_policy=retry_policy,
        )
        await consumer.start(topology.partition_queues)
    except BaseException:
        await connection.close()
        raise
    log.info(
        "projector_started",
        partitions=settings.projector_partitions,
        prefetch=settings.prefetch,
        projections=[projection.name for projection in chosen],
    )
    return ProjectorRuntime(connection, channel, consumer, topology)


@dataclass
class QueryService:
    """Everything `python -m query_service` runs, built from settings."""

    settings: QueryServiceSettings
    mongo: AsyncMongoClient[Document]
    projector: ProjectorRuntime | None
    app: FastAPI | None

    async def stop_projector(self, grace_seconds: float = 10.0) -> None:
        if self.projector is not None:
            projector, self.projector = self.projector, None
            await projector.stop(grace_seconds)

    async def close(self) -> None:
        """Stop the projector if still running, then close the MongoDB client."""
        try:
            await self.stop_projector()
        finally:
            await self.mongo.close()


async def bootstrap(settings: QueryServiceSettings) -> QueryService:
    """Build the service: one MongoDB client shared by the projector and the API."""
    mongo = create_client(settings.mongo_url)
    database = mongo[settings.mongo_db]
    try:
        projector = await start_projector(settings, database) if settings.run_projector else None
    except BaseException:
        await mongo.close()
        raise
    app = create_app(settings, database=database) if settings.run_api else None
    return QueryService(settings=settings, mongo=mongo, projector=projector, app=app)
