"""Least privilege on RabbitMQ: the users of scripts/rabbitmq-users can do their job, no more."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import pytest

from command_service.bootstrap import start
from command_service.settings import CommandServiceSettings
from shared import topology
from shared.client import CommandClient
from shared.ledger import OpenAccount

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parents[2] / "scripts" / "rabbitmq-users"


@pytest.fixture
async def users(broker: str) -> AsyncIterator[dict[str, str]]:
    """AMQP URLs of fresh command, query and client users in the test vhost."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("this test creates broker users with rabbitmqctl, which is not on PATH")
    vhost = unquote(urlsplit(broker).path.lstrip("/")) or "/"
    prefix = f"t{uuid.uuid4().hex[:6]}-"
    run = await asyncio.create_subprocess_exec(
        "bash", str(SCRIPT), "--vhost", vhost, "--prefix", prefix, stdout=subprocess.PIPE
    )
    out, _ = await run.communicate()
    assert run.returncode == 0
    urls = dict(line.split(" ", 1) for line in out.decode().splitlines())
    yield urls
    for role in urls:
        delete = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", "delete_user", f"{prefix}{role}", stdout=subprocess.DEVNULL
        )
        await delete.wait()
        (SCRIPT.parents[1] / ".local" / "secrets" / f"rabbitmq-{prefix}{role}").unlink()


async def refused(
    action: Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]], url: str
) -> bool:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await action(channel)
        except aiormq.exceptions.ChannelAccessRefused:
            return True
        return False
    finally:
        await connection.close()


def publish_to(
    exchange: str, routing_key: str = "x"
) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]:
    async def action(channel: aio_pika.abc.AbstractChannel) -> object:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        return await target.publish(aio_pika.Message(b"{}"), routing_key=routing_key)

    return action


def consume(queue: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]:
    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.reject(requeue=True)

    async def action(channel: aio_pika.abc.AbstractChannel) -> object:
        declared = await channel.get_queue(queue, ensure=False)
        return await declared.consume(ignore)

    return action


async def test_each_service_works_with_its_own_user_and_forbidden_actions_are_refused(
    users: dict[str, str], command_settings: CommandServiceSettings
) -> None:
    service = await start(command_settings.model_copy(update={"amqp_url": users["command"]}))
    try:
        async with await CommandClient.connect(users["client"]) as client:
            reply = await client.send_command(
                OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4()
            )
        assert reply.status == "accepted"

        partition = topology.command_partition_queue(0)
        # Clients publish commands, nothing else.
        assert await refused(consume(partition), users["client"])
        assert await refused(publish_to(topology.EVENTS_EXCHANGE), users["client"])
        assert await refused(publish_to("", partition), users["client"])
        # The query service can neither publish commands nor read them, nor use the default
        # exchange to reach a command queue.
        assert await refused(publish_to(topology.COMMANDS_EXCHANGE), users["query"])
        assert await refused(consume(partition), users["query"])
        assert await refused(publish_to("", partition), users["query"])
        # What it needs is allowed: its own queues on the events, and replay requests.
        assert not await refused(publish_to(topology.REPLAY_EXCHANGE, "none"), users["query"])
        assert not await refused(lambda channel: _projector_queue(channel), users["query"])
    finally:
        await service.stop()


async def _projector_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    events = await channel.declare_exchange(
        topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(topology.projector_partition_queue(7), auto_delete=True)
    await queue.bind(events, routing_key="#")
