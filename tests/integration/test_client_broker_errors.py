"""The client SDK when the broker goes away or refuses: a reply, or the SDK's own error.

A command published while the connection is down waits for the robust connection to come back
(within the call's timeout) and is published then; a broker that stays away gives
`BrokerUnavailableError` once the timeout is spent; a publish the broker refuses gives
`BrokerRefusedError` at once. Never a driver exception.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import pytest

from command_service.bootstrap import CommandService
from shared import topology
from shared.client import (
    BrokerRefusedError,
    BrokerUnavailableError,
    CommandClient,
    CommandClientError,
    CommandServiceUnavailableError,
)
from shared.ledger import DepositMoney, OpenAccount
from shared.messages import Reply
from tests.tcp_proxy import TcpProxy, through

pytestmark = pytest.mark.integration


async def wait_until_disconnected(client: CommandClient, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while client.is_connected:
            await asyncio.sleep(0.05)


async def close_broker_connections(amqp_url: str) -> None:
    """What clients see when a broker node restarts: RabbitMQ closes every connection."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("this test closes broker connections with rabbitmqctl, which is not on PATH")
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    run = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test: broker-close"
    )
    assert await run.wait() == 0


async def test_a_command_sent_while_the_connection_is_down_is_answered_after_it_returns(
    command_service: CommandService, broker: str, broker_proxy: TcpProxy
) -> None:
    client = await CommandClient.connect(through(broker_proxy, broker))
    try:
        account = uuid.uuid4()
        opened = await client.send_command(
            OpenAccount(owner_id="alice", currency="EUR"), account, timeout=20
        )
        assert opened.status == "accepted"
        await broker_proxy.cut()
        await wait_until_disconnected(client)
        sending = asyncio.create_task(
            client.send_command(DepositMoney(amount=5), account, timeout=30)
        )
        await asyncio.sleep(1.0)  # the publish is waiting for the connection, not failed
        assert not sending.done(), sending.exception()
        await broker_proxy.restore()
        reply = await sending
        assert (reply.status, reply.version) == ("accepted", 2)
    finally:
        await client.close()


async def test_a_broker_that_stays_away_gives_the_sdks_error_within_the_timeout(
    command_service: CommandService, broker: str, broker_proxy: TcpProxy
) -> None:
    client = await CommandClient.connect(through(broker_proxy, broker))
    try:
        await broker_proxy.cut()
        await wait_until_disconnected(client)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError) as raised:
            await client.send_command(
                OpenAccount(owner_id="bob", currency="EUR"), uuid.uuid4(), timeout=3
            )
        elapsed = time.monotonic() - started
        assert 2.5 <= elapsed < 6, elapsed
        assert isinstance(raised.value, CommandClientError)
        assert "3" in str(raised.value)  # names the timeout it waited
        # A command without a reply (fire and forget) waits and fails the same way.
        with pytest.raises(BrokerUnavailableError):
            await client.publish_command(
                OpenAccount(owner_id="bob", currency="EUR"), uuid.uuid4(), timeout=1
            )
    finally:
        await client.close()


async def test_commands_in_flight_during_a_broker_side_close_get_replies_or_the_sdks_error(
    command_service: CommandService, broker: str
) -> None:
    client = await CommandClient.connect(broker)
    try:
        accounts = [uuid.uuid4() for _ in range(20)]

        async def open_one(index: int) -> Reply | CommandClientError:
            await asyncio.sleep(index * 0.1)  # spread over the close and the reconnection
            try:
                return await client.send_command(
                    OpenAccount(owner_id="carol", currency="EUR"), accounts[index], timeout=30
                )
            except CommandClientError as e:
                return e

        sends = [asyncio.create_task(open_one(index)) for index in range(len(accounts))]
        await asyncio.sleep(0.3)
        await close_broker_connections(broker)
        # Anything but a Reply or the SDK's own error would raise out of gather here.
        outcomes = await asyncio.gather(*sends)
        errors = [o for o in outcomes if not isinstance(o, Reply)]
        # Replies lost with the closed connection are asked for again once it is back, so
        # every command is answered: accepted, or a duplicate of its earlier acceptance.
        assert not errors, errors
        assert {o.status for o in outcomes if isinstance(o, Reply)} <= {"accepted", "duplicate"}
        # And the client goes on working.
        again = await client.send_command(DepositMoney(amount=1), accounts[0], timeout=30)
        assert again.status == "accepted"
    finally:
        await client.close()


async def rabbitmqctl(*args: str) -> None:
    run = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", *args)
    assert await run.wait() == 0, args


@pytest.fixture
async def reply_only_user(broker: str) -> AsyncIterator[str]:
    """The URL of a user who may use reply queues but not publish to `cqrs.commands`."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("this test creates a broker user with rabbitmqctl, which is not on PATH")
    vhost = unquote(urlsplit(broker).path.lstrip("/")) or "/"
    name, password = f"t{uuid.uuid4().hex[:8]}-reader", uuid.uuid4().hex
    await rabbitmqctl("add_user", name, password)
    try:
        replies = r"^cqrs\.reply\..*$"
        await rabbitmqctl("set_permissions", "-p", vhost, name, replies, replies, replies)
        parts = urlsplit(broker)
        host = parts.netloc.rpartition("@")[2]
        yield urlunsplit(parts._replace(netloc=f"{name}:{password}@{host}", path=quote(vhost)))
    finally:
        await rabbitmqctl("delete_user", name)


async def test_a_publish_the_broker_refuses_is_the_sdks_error_at_once_and_the_client_goes_on(
    command_service: CommandService, reply_only_user: str
) -> None:
    client = await CommandClient.connect(reply_only_user)
    try:
        for _ in range(2):  # the channel the broker closed is reopened for the next call
            started = time.monotonic()
            with pytest.raises(BrokerRefusedError) as raised:
                await client.send_command(
                    OpenAccount(owner_id="dave", currency="EUR"), uuid.uuid4(), timeout=10
                )
            assert time.monotonic() - started < 5  # not retried until the timeout
            assert "ACCESS_REFUSED" in str(raised.value)
    finally:
        await client.close()


async def test_a_command_no_queue_takes_is_the_sdks_error_at_once(broker: str) -> None:
    # The commands exchange with nothing bound to it: a command service that never got further.
    connection = await aio_pika.connect(broker)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(
            topology.COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
    finally:
        await connection.close()
    async with await CommandClient.connect(broker) as client:
        started = time.monotonic()
        with pytest.raises(CommandServiceUnavailableError, match="no queue took the command"):
            await client.send_command(
                OpenAccount(owner_id="fred", currency="EUR"), uuid.uuid4(), timeout=10
            )
        assert time.monotonic() - started < 5  # not a wait for a reply that cannot come
