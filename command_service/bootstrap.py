"""The composition root: builds pools, channels, the consumer and the relay, and closes them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass, field

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from command_service.adapters import broker
from command_service.adapters.event_store import PostgresEventStore, create_pool
from command_service.adapters.migrations import migrate_schema
from command_service.adapters.partition_leases import PartitionLeases
from command_service.adapters.relay import RELAY_SUBSCRIPTION, EventPublisher
from command_service.adapters.subscription import Subscription
from command_service.domain.account import Account
from command_service.domain.process import ProcessManager
from command_service.domain.transfer import Transfer, TransferProcess
from command_service.entrypoints.commands import CommandConsumer
from command_service.entrypoints.http import HttpEndpoint, Vitals, create_app, replica_name, serve
from command_service.entrypoints.replay import ReplayServer
from command_service.metrics import CommandMetrics
from command_service.service_layer.handlers import handle_command
from command_service.service_layer.process_managers import ProcessManagerRunner
from command_service.service_layer.registry import CommandRegistry
from shared.settings import CommandServiceSettings

log = structlog.get_logger(__name__)


def build_registry() -> CommandRegistry:
    """Register every aggregate the service handles. Add yours here."""
    registry = CommandRegistry()
    registry.register(Account)
    registry.register(Transfer)
    return registry


def build_process_managers() -> list[ProcessManager]:
    """Every process manager the service runs. Add yours here."""
    return [TransferProcess()]


@dataclass
class CommandService:
    """The running service: what `start` built and `stop` closes."""

    settings: CommandServiceSettings
    pool: asyncpg.Pool
    connection: AbstractRobustConnection
    consumer: CommandConsumer
    subscriptions: list[Subscription]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    leases: PartitionLeases | None = None
    http: HttpEndpoint | None = None

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.consumer.stop()
        await self.connection.close()
        await self.pool.close()
        log.info("command_service_stopped")


async def _start_partition(consumer: CommandConsumer, queue: str) -> None:
    consumer.start_partition(queue)


async def start(settings: CommandServiceSettings) -> CommandService:
    """Migrate the schema, declare the topology, and start consuming and relaying."""
    await migrate_schema(settings.postgres_migration_dsn or settings.postgres_dsn)
    pool = await create_pool(settings.postgres_dsn, settings.postgres_pool_size)
    amqp = await aio_pika.connect_robust(settings.amqp_url)
    topology_channel = await amqp.channel()
    declared = await broker.declare_command_topology(topology_channel, settings.command_partitions)
    queues = [queue.name for queue in declared]
    await topology_channel.close()
    confirmed = await amqp.channel(publisher_confirms=True)
    replies = await amqp.channel(publisher_confirms=False)
    relay_channel = await amqp.channel(publisher_confirms=True)
    registry = build_registry()
    metrics = CommandMetrics(registry.command_types)
    handle = functools.partial(
        handle_command,
        store=PostgresEventStore(pool, append_seconds=metrics.event_append_seconds),
        registry=registry,
        concurrency_retries=settings.concurrency_retries,
        snapshot_every=settings.snapshot_every,
    )
    consumer = CommandConsumer(
        connection=amqp,
        prefetch=settings.prefetch,
        handle=handle,
        registry=registry,
        replies=replies.default_exchange,
        dead_letters=await broker.declare_dead_letter_exchange(confirmed),
        max_message_bytes=settings.max_message_bytes,
        transient_retry_seconds=settings.command_retry_seconds,
        metrics=metrics,
    )
    relay = Subscription(
        name=RELAY_SUBSCRIPTION,
        dsn=settings.postgres_dsn,
        handler=EventPublisher(await broker.declare_events_exchange(relay_channel), metrics),
        batch_size=settings.relay_batch_size,
        poll_seconds=settings.relay_poll_seconds,
    )
    process_managers = [
        Subscription(
            name=process.name,
            dsn=settings.postgres_dsn,
            handler=ProcessManagerRunner(process, handle=handle, registry=registry),
            batch_size=settings.relay_batch_size,
            poll_seconds=settings.relay_poll_seconds,
        )
        for process in build_process_managers()
    ]
    replay_channel = await amqp.channel(publisher_confirms=True)
    await replay_channel.set_qos(prefetch_count=1)
    replay_queue = await broker.declare_replay_queue(replay_channel)
    await replay_queue.consume(
        ReplayServer(
            pool=pool,
            exchange=replay_channel.default_exchange,
            batch_size=settings.relay_batch_size,
        )
    )
    service = CommandService(settings, pool, amqp, consumer, [relay, *process_managers])
    service.tasks = [asyncio.create_task(s.run(), name=s.name) for s in service.subscriptions]
    leases = PartitionLeases(
        dsn=settings.postgres_dsn,
        partitions=len(queues),
        acquire=lambda index: _start_partition(consumer, queues[index]),
        release=lambda index: consumer.stop_partition(queues[index]),
    )
    service.leases = leases
    service.tasks.append(asyncio.create_task(leases.run(), name="partition-leases"))
    vitals = Vitals(pool, amqp, leases, consumer, relay, metrics, replica_name())
    try:
        service.http = await serve(create_app(vitals), settings.http_host, settings.http_port)
    except BaseException:
        await service.stop()
        raise
    log.info(
        "command_service_started",
        partitions=settings.command_partitions,
        http=f"{settings.http_host}:{service.http.port}",
    )
    return service
