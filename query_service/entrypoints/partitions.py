"""The projector's partition queues: one channel each, and sharing them out between replicas.

Single-active-consumer lets the replica that subscribed to a queue first take all its messages,
so the first replica started would project every partition while the others only stand by.
Each replica therefore checks every `interval` how many replicas consume the partitions (M, the
consumers of a queue) and on how many busy partitions it is the active one; above its share,
ceil(P / M), it re-subscribes to the excess ones. That puts it at the back of those queues'
waiting lists and the broker makes the next replica active; shares settle within a few rounds.

Re-subscribing closes the partition's channel: the broker returns its unacknowledged messages
to the head of the queue, in order, for the next replica. Whatever this replica is still writing
for them is version-guarded, so the same event written by both changes the read model once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random

import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from cqrs_runtime.supervision import Supervisor, mark_healthy
from query_service.adapters import broker
from query_service.entrypoints.event_consumer import ProjectorConsumer

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


class PartitionSubscriptions:
    """Consumes each partition queue on a channel of its own, so it can be handed over alone."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        consumer: ProjectorConsumer,
        topology: broker.ProjectorTopology,
        *,
        prefetch: int,
    ) -> None:
        self._connection = connection
        self._consumer = consumer
        self._specs = {spec.name: spec for spec in topology.partition_queues}
        self._prefetch = prefetch
        self._channels: dict[str, AbstractChannel] = {}
        self.queues: dict[str, AbstractQueue] = {}

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    async def start(self) -> None:
        for name in self._specs:
            await self._subscribe(name)
        log.info("projector_consuming", queues=self.names)

    async def _subscribe(self, name: str) -> None:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        queue = await broker.declare_queue(channel, self._specs[name])
        self._channels[name] = channel
        self.queues[name] = queue
        await self._consumer.add(queue)

    async def resubscribe(self, name: str) -> None:
        """Go to the back of the queue's consumers; its unacked messages return to the queue."""
        channel = self._channels.pop(name)
        # First make sure nothing more is settled on it (see ProjectorConsumer._settle).
        self._consumer.release(name, await channel.get_underlay_channel())
        await channel.close()
        await self._subscribe(name)
        log.info("partition_handed_over", queue=name)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await channel.close()


class PartitionBalancer:
    """Every `interval`, hands busy partitions above this replica's share to the others."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        subscriptions: PartitionSubscriptions,
        consumer: ProjectorConsumer,
        *,
        interval: float,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._connection = connection
        self._subscriptions = subscriptions
        self._consumer = consumer
        self._interval = interval
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._running = False

    TASK = "partition-balancer"

    def start(self) -> None:
        if self._interval > 0 and not self._running:
            self._supervisor.spawn(self.TASK, self._run, restart_on_return=True)
            self._running = True

    async def stop(self) -> None:
        if self._running:
            await self._supervisor.stop(self.TASK)
            self._running = False

    async def _run(self) -> None:
        # Replicas started together should not all look at once.
        await asyncio.sleep(self._interval * random.uniform(0.5, 1.5))
        while True:
            try:
                await self.balance()
            except CONNECTION_EXCEPTIONS as e:
                log.warning("partition_balance_failed", error=repr(e))
            else:
                mark_healthy()
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.2))

    async def balance(self) -> list[str]:
        """Hand over what is above this replica's share; returns the queues handed over."""
        names = self._subscriptions.names
        replicas = await self._replicas(names)
        share = math.ceil(len(names) / max(replicas, 1))
        busy = self._consumer.busy_queues(within=2 * self._interval)
        if len(busy) <= share:
            return []
        excess = random.sample(busy, len(busy) - share)
        log.info(
            "partitions_above_share",
            replicas=replicas,
            share=share,
            active=len(busy),
            handing_over=excess,
        )
        for name in excess:
            await self._subscriptions.resubscribe(name)
        return excess

    async def _replicas(self, names: list[str]) -> int:
        channel = await self._connection.channel()
        try:
            counts = []
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                counts.append(int(queue.declaration_result.consumer_count or 0))
            return max(counts, default=1)
        finally:
            if not channel.is_closed:
                await channel.close()
