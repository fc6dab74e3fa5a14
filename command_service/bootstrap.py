"""The composition root: builds pools, channels, the consumer and the relay, and closes them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from command_service.adapters import broker
from command_service.adapters.migrations import migrate_schema
from command_service.adapters.partition_leases import PartitionLeases
from command_service.adapters.postgres_event_store import PostgresEventStore, create_pool
from command_service.adapters.relay import RELAY_SUBSCRIPTION, EventPublisher
from command_service.adapters.subscription import RECOVERABLE_ERRORS, Subscription
from command_service.entrypoints.commands import CommandConsumer
from command_service.entrypoints.http import HttpEndpoint, Vitals, create_app, replica_name, serve
from command_service.entrypoints.replay_server import ReplayServer
from command_service.metrics import CommandMetrics
from command_service.model.authorization import AuthorizationPolicy
from command_service.model.domain import CommandDomain, load_command_domains
from command_service.service_layer.access_control import authorization
from command_service.service_layer.handlers import handle_command, handle_commands
from command_service.service_layer.process_managers import ProcessManagerRunner
from command_service.service_layer.registry import CommandRegistry
from command_service.settings import CommandServiceSettings
from cqrs_runtime.supervision import Supervisor
from shared.amqp import tolerate_invalid_utf8

log = structlog.get_logger(__name__)

LEASES_TASK = "partition-leases"


def build_policy(
    settings: CommandServiceSettings, domains: Sequence[CommandDomain]
) -> AuthorizationPolicy | None:
    """Who may send which command (`CQRS_AUTHORIZATION`); None lets anyone send anything."""
    if settings.authorization == "off":
        log.warning(
            "authorization_off", detail="every login may send every command (CQRS_AUTHORIZATION)"
        )
        return None
    return authorization(domains, privileged=settings.privileged)


@dataclass
class CommandService:
    """The running service: what `start` built and `stop` closes."""

    settings: CommandServiceSettings
    pool: asyncpg.Pool
    connection: AbstractRobustConnection
    consumer: CommandConsumer
    subscriptions: list[Subscription]
    supervisor: Supervisor
    leases: PartitionLeases | None = None
    http: HttpEndpoint | None = None

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        # The lease loop stops the partitions' consumers as it ends; then everything else.
        await self.supervisor.stop(LEASES_TASK)
        await self.supervisor.stop_all()
        await self.consumer.stop()
        await self.connection.close()
        await self.pool.close()
        log.info("command_service_stopped")


async def _start_partition(consumer: CommandConsumer, queue: str) -> None:
    consumer.start_partition(queue)


async def start(
    settings: CommandServiceSettings,
    *,
    domains: Sequence[CommandDomain] | None = None,
    supervisor: Supervisor | None = None,
) -> CommandService:
    """Migrate the schema, declare the topology, and start consuming and relaying.

    The service runs `domains` (by default the ones `CQRS_DOMAINS` names); a clash between two
    of them stops it here. Every long-lived task runs under `supervisor` (a new one by default:
    tests pass their own).
    """
    if domains is None:
        domains = load_command_domains(settings.domain_names)
    registry = CommandRegistry.from_domains(domains)
    tolerate_invalid_utf8()
    await migrate_schema(settings.postgres_migration_dsn or settings.postgres_dsn)
    pool = await create_pool(
        settings.postgres_dsn,
        settings.postgres_pool_size,
        stall_timeout=settings.leader_timeout_seconds,
    )
    amqp = await aio_pika.connect_robust(settings.amqp_url)
    topology_channel = await amqp.channel()
    declared = await broker.declare_command_topology(
        topology_channel,
        settings.command_partitions,
        broker.dead_letter_bounds(
            settings.dead_letter_max_messages, settings.dead_letter_max_bytes
        ),
    )
    queues = [queue.name for queue in declared]
    await topology_channel.close()
    confirmed = await amqp.channel(publisher_confirms=True)
    replies = await amqp.channel(publisher_confirms=False)
    relay_channel = await amqp.channel(publisher_confirms=True)
    metrics = CommandMetrics(registry.command_types)
    if supervisor is None:
        supervisor = Supervisor()
    supervisor.transient = RECOVERABLE_ERRORS
    metrics.watch(supervisor)
    store = PostgresEventStore(pool, append_seconds=metrics.event_append_seconds)
    policy = build_policy(settings, domains)
    handle = functools.partial(
        handle_command,
        store=store,
        registry=registry,
        concurrency_retries=settings.concurrency_retries,
        snapshot_every=settings.snapshot_every,
        authorize=policy,
    )
    handle_batch = functools.partial(
        handle_commands,
        store=store,
        registry=registry,
        snapshot_every=settings.snapshot_every,
        authorize=policy,
    )
    consumer = CommandConsumer(
        connection=amqp,
        prefetch=settings.prefetch,
        handle=handle,
        handle_batch=handle_batch,
        batch_size=settings.command_batch_size,
        registry=registry,
        replies=replies.default_exchange,
        dead_letters=await broker.declare_dead_letter_exchange(confirmed),
        max_message_bytes=settings.max_message_bytes,
        transient_retry_seconds=settings.command_retry_seconds,
        metrics=metrics,
        supervisor=supervisor,
        reply_queue_prefix=settings.reply_queue_prefix,
    )
    relay = Subscription(
        name=RELAY_SUBSCRIPTION,
        dsn=settings.postgres_dsn,
        handler=EventPublisher(await broker.declare_events_exchange(relay_channel), metrics),
        batch_size=settings.relay_batch_size,
        poll_seconds=settings.relay_poll_seconds,
        leader_timeout=settings.leader_timeout_seconds,
    )
    process_managers = [
        Subscription(
            name=process.name,
            dsn=settings.postgres_dsn,
            handler=ProcessManagerRunner(
                process, handle=handle, handle_batch=handle_batch, registry=registry
            ),
            batch_size=settings.relay_batch_size,
            poll_seconds=settings.relay_poll_seconds,
            leader_timeout=settings.leader_timeout_seconds,
        )
        for domain in domains
        for process in domain.process_managers
    ]
    replay_channel = await amqp.channel(publisher_confirms=True)
    await replay_channel.set_qos(prefetch_count=1)
    replay_queue = await broker.declare_replay_queue(replay_channel)
    await replay_queue.consume(
        ReplayServer(
            pool=pool,
            exchange=replay_channel.default_exchange,
            batch_size=settings.relay_batch_size,
            supervisor=supervisor,
        )
    )
    service = CommandService(settings, pool, amqp, consumer, [relay, *process_managers], supervisor)
    for subscription in service.subscriptions:
        supervisor.spawn(subscription.name, subscription.run, restart_on_return=True)
    leases = PartitionLeases(
        dsn=settings.postgres_dsn,
        partitions=len(queues),
        acquire=lambda index: _start_partition(consumer, queues[index]),
        release=lambda index: consumer.stop_partition(queues[index]),
        leader_timeout=settings.leader_timeout_seconds,
    )
    service.leases = leases
    supervisor.spawn(LEASES_TASK, leases.run, restart_on_return=True)
    vitals = Vitals(pool, amqp, leases, consumer, relay, metrics, replica_name(), supervisor)
    try:
        service.http = await serve(
            create_app(vitals),
            settings.http_host,
            settings.http_port,
            header_timeout=settings.http_header_timeout_seconds,
            supervisor=supervisor,
        )
    except BaseException:
        await service.stop()
        raise
    log.info(
        "command_service_started",
        partitions=settings.command_partitions,
        authorization=settings.authorization,
        privileged_users=sorted(settings.privileged) if settings.authorization != "off" else None,
        http=f"{settings.http_host}:{service.http.port}",
    )
    return service
