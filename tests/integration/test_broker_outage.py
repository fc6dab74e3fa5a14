"""The broker going away: partition consumers come back, and only the ones still wanted.

A replica that gives a partition up while its broker connection is down must not get the
partition's consumer back when the connection is restored: that consumer would sit on the
partition (single active consumer) with nobody reading it, and its commands would wait forever.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from command_service.bootstrap import start
from command_service.settings import CommandServiceSettings
from shared import topology
from tests.tcp_proxy import TcpProxy, through

pytestmark = pytest.mark.integration


async def consumer_counts(broker: str, partitions: int) -> list[int]:
    connection = await aio_pika.connect(broker)
    try:
        channel = await connection.channel()
        counts = []
        for index in range(partitions):
            queue = await channel.declare_queue(
                topology.command_partition_queue(index), passive=True
            )
            counts.append(queue.declaration_result.consumer_count or 0)
        return counts
    finally:
        await connection.close()


async def wait_for_counts(broker: str, wanted: list[int], timeout: float = 20.0) -> list[int]:
    deadline = asyncio.get_running_loop().time() + timeout
    while (counts := await consumer_counts(broker, len(wanted))) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"consumers {counts}, not {wanted}"
        await asyncio.sleep(0.2)
    return counts


async def test_a_partition_given_up_during_an_outage_is_not_consumed_after_it(
    command_settings: CommandServiceSettings, broker_proxy: TcpProxy, broker: str
) -> None:
    settings = command_settings.model_copy(update={"amqp_url": through(broker_proxy, broker)})
    service = await start(settings)
    try:
        await wait_for_counts(broker, [1, 1])
        # The robust connection restores every channel it still holds, then calls these: once
        # called, any consumer it was going to bring back is there.
        restored = asyncio.Event()
        service.connection.reconnect_callbacks.add(lambda _: restored.set())
        await broker_proxy.cut()
        await asyncio.sleep(0.5)
        # What the leases do when another replica takes the partition: stop consuming it.
        await service.consumer.stop_partition(topology.command_partition_queue(0))
        await broker_proxy.restore()
        async with asyncio.timeout(20):
            await restored.wait()
        # Partition 1 is consumed again after the reconnection; partition 0 stays free.
        await wait_for_counts(broker, [0, 1])
    finally:
        await service.stop()


async def test_every_partition_is_consumed_again_after_the_connection_returns(
    command_settings: CommandServiceSettings, broker_proxy: TcpProxy, broker: str
) -> None:
    settings = command_settings.model_copy(update={"amqp_url": through(broker_proxy, broker)})
    service = await start(settings)
    try:
        await wait_for_counts(broker, [1, 1])
        for _ in range(2):
            await broker_proxy.cut()
            await asyncio.sleep(0.5)
            await broker_proxy.restore()
            await wait_for_counts(broker, [1, 1])
        assert service.consumer.partitions == [
            topology.command_partition_queue(0),
            topology.command_partition_queue(1),
        ]
    finally:
        await service.stop()
