"""No message can stop the command service, and nothing in it dies silently.

Against real RabbitMQ and PostgreSQL, the service in-process: strings that pass the schema but
no later stage could take are refused at the edge; a command whose handling raises is
dead-lettered and the partition goes on; replies go to reply queues only; the `aggregate_id`
header must be the envelope's; and each kind of long-lived task, made to fail, is logged,
counted, restarted and shown in `/readyz` until it works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pamqp.encode
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from command_service.adapters import relay as relay_module
from command_service.adapters.partition_leases import PartitionLeases
from command_service.bootstrap import CommandService, start
from command_service.domains.ledger.account import Account
from command_service.entrypoints import http as http_module
from command_service.entrypoints.commands import CommandConsumer
from command_service.entrypoints.replay_server import ReplayServer
from command_service.service_layer.process_managers import ProcessManagerRunner
from command_service.settings import CommandServiceSettings
from cqrs_runtime.supervision import Backoff, Supervisor
from shared import topology
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount, RequestTransfer
from shared.messages import ReplayRequest, Reply
from tests.integration.test_command_service import drain
from tests.metrics_support import scrape, value
from tests.query_support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(broker)
    yield await connection.channel()
    await connection.close()


async def publish(
    channel: AbstractChannel,
    envelope: dict[str, Any],
    *,
    reply_to: str | None,
    header: str | None = None,
) -> str:
    correlation_id = str(uuid.uuid4())
    exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
    aggregate_id = header if header is not None else str(envelope["aggregate_id"])
    await exchange.publish(
        aio_pika.Message(
            json.dumps(envelope).encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=reply_to,
            headers={topology.AGGREGATE_ID_HEADER: aggregate_id},
        ),
        routing_key=f"account.{envelope['type']}",
    )
    return correlation_id


async def answer(replies: AbstractQueue, correlation_id: str) -> Reply:
    async with asyncio.timeout(15):
        while True:
            [message] = await drain(replies, 1)
            if message.correlation_id == correlation_id:
                return Reply.model_validate_json(message.body)


def opening(account: uuid.UUID, **metadata: str) -> dict[str, Any]:
    return {
        "type": "OpenAccount",
        "aggregate_id": str(account),
        "payload": {"owner_id": "alice", "currency": "EUR", "initial_deposit": 10},
        "metadata": metadata,
    }


async def stored_streams(dsn: str) -> set[uuid.UUID]:
    connection = await asyncpg.connect(dsn)
    try:
        return {row["stream_id"] for row in await connection.fetch("SELECT stream_id FROM events")}
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        # 100 characters, within a character limit, but 300 bytes: no AMQP property holds it,
        # so once stored the relay could never publish its event.
        ({"correlation_id": "€" * 100}, "correlation_id"),
        # Valid JSON that PostgreSQL's jsonb refuses to store.
        ({"user": "x\u0000"}, "user"),
        ({"causation_id": "line\nbreak"}, "causation_id"),
    ],
)
async def test_strings_no_later_stage_could_take_are_refused_at_the_edge(
    metadata: dict[str, str],
    why: str,
    channel: AbstractChannel,
    command_service: CommandService,
    client: CommandClient,
    pg_dsn: str,
) -> None:
    replies = await channel.declare_queue(exclusive=True)
    account = uuid.uuid4()
    reply = await answer(
        replies, await publish(channel, opening(account, **metadata), reply_to=replies.name)
    )
    assert reply.status == "rejected"
    assert reply.error is not None and reply.error.code == "invalid_envelope"
    assert why in reply.error.message
    # The partition goes on, and the refused command stored nothing.
    sentinel = uuid.uuid4()
    ok = await client.send_command(OpenAccount(owner_id="bob", currency="EUR"), sentinel)
    assert ok.status == "accepted"
    assert account not in await stored_streams(pg_dsn)


async def test_a_command_whose_handling_raises_is_dead_lettered_and_the_partition_goes_on(
    command_service: CommandService,
    client: CommandClient,
    channel: AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decide = Account.decide

    def explode_on_13(self: Account, command: Any) -> Any:
        if isinstance(command, DepositMoney) and command.amount == 13:
            raise ZeroDivisionError("a bug in the domain")
        return decide(self, command)

    monkeypatch.setattr(Account, "decide", explode_on_13)
    account = uuid.uuid4()
    await client.send_command(OpenAccount(owner_id="carol", currency="EUR"), account)

    failed = await client.send_command(DepositMoney(amount=13), account)
    assert failed.status == "rejected"
    assert failed.error is not None and failed.error.code == "internal_error"
    assert "ZeroDivisionError" not in failed.error.message  # the details are for the operator
    dead = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
    [dead_letter] = await drain(dead, 1)
    assert str(dead_letter.headers[topology.REASON_HEADER]).startswith(
        "internal_error: ZeroDivisionError"
    )
    # Same aggregate, so the same partition: it still takes commands.
    after = await client.send_command(DepositMoney(amount=5), account)
    assert (after.status, after.version) == ("accepted", 2)


async def test_replies_go_to_reply_queues_only(
    command_service: CommandService, client: CommandClient, channel: AbstractChannel
) -> None:
    # A queue the client may not write to: the command service's rights must not reach it.
    victim = await channel.declare_queue(f"victim-{uuid.uuid4().hex}", auto_delete=True)
    account = uuid.uuid4()
    await publish(channel, opening(account), reply_to=victim.name)
    server_named = await channel.declare_queue(exclusive=True)  # amq.gen-...
    assert server_named.name.startswith("amq.gen-")
    deposit = {
        "type": "DepositMoney",
        "aggregate_id": str(account),
        "payload": {"amount": 1},
    }
    reply = await answer(server_named, await publish(channel, deposit, reply_to=server_named.name))
    # The deposit came after the opening on the same partition, so the opening was handled.
    assert (reply.status, reply.version) == ("accepted", 3)
    assert await victim.get(fail=False) is None


async def test_the_aggregate_id_header_must_be_the_envelopes(
    command_service: CommandService, client: CommandClient, channel: AbstractChannel
) -> None:
    replies = await channel.declare_queue(exclusive=True)
    account = uuid.uuid4()
    reply = await answer(
        replies,
        await publish(channel, opening(account), reply_to=replies.name, header=str(uuid.uuid4())),
    )
    assert reply.status == "rejected"
    assert reply.error is not None and reply.error.code == "aggregate_id_mismatch"
    upper = await answer(
        replies,
        await publish(
            channel, opening(account), reply_to=replies.name, header=str(account).upper()
        ),
    )
    assert upper.error is not None and upper.error.code == "aggregate_id_mismatch"
    ok = await client.send_command(OpenAccount(owner_id="dan", currency="EUR"), account)
    assert ok.status == "accepted"


async def test_a_message_whose_properties_are_not_utf8_does_not_drop_the_connection(
    command_service: CommandService,
    client: CommandClient,
    channel: AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RabbitMQ passes property and header-name bytes through unchecked; the AMQP codec used to
    drop the consumer's whole connection on them, and again on every redelivery."""
    replies = await channel.declare_queue(exclusive=True)
    account = uuid.uuid4()
    envelope = opening(account)
    with raw_short_strings(monkeypatch):
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(envelope).encode(),
                content_type="application/json",
                message_id=f"{RAW}id",
                correlation_id="not-utf8-1",
                reply_to=replies.name,
                headers={topology.AGGREGATE_ID_HEADER: str(account), f"{RAW}key": "v"},
            ),
            routing_key="account.OpenAccount",
        )
    reply = await answer(replies, "not-utf8-1")
    assert (reply.status, reply.aggregate_id) == ("accepted", account)
    sentinel = await client.send_command(DepositMoney(amount=1), account)
    assert (sentinel.status, sentinel.version) == ("accepted", 3)


RAW = "\x00raw:"


@contextlib.contextmanager
def raw_short_strings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While active, a string starting with `RAW` is sent as bytes that are not UTF-8."""
    original = pamqp.encode._string

    def encode(encoder: Any, value: Any) -> bytes:
        if isinstance(value, str) and value.startswith(RAW):
            raw = b"\xff\xfe" + value[len(RAW) :].encode()
            return bytes(encoder.pack(len(raw))) + raw
        return bytes(original(encoder, value))

    with monkeypatch.context() as patch:
        patch.setattr(pamqp.encode, "_string", encode)
        yield


# --- supervision ---------------------------------------------------------------------------------


class InjectedFailure(Exception):
    """What a `Fault` raises: no driver or library treats it as an outage of theirs."""


class Fault:
    """Makes a method raise until `heal()`; `only(*args)` picks the calls it hits."""

    def __init__(self, only: Callable[..., bool] = lambda *args: True) -> None:
        self.healed = False
        self.hits = 0
        self._only = only

    def heal(self) -> None:
        self.healed = True

    def check(self, *args: Any) -> None:
        if not self.healed and self._only(*args):
            self.hits += 1
            raise InjectedFailure(f"injected failure {self.hits}")

    def around(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.check(*args)
            return await original(*args, **kwargs)

        return wrapper


def first_partition(consumer: CommandConsumer, queue: AbstractQueue, *args: Any) -> bool:
    return queue.name == topology.command_partition_queue(0)


async def exercise_relay(service: CommandService, client: CommandClient) -> None:
    await client.send_command(OpenAccount(owner_id="r", currency="EUR"), uuid.uuid4())


async def exercise_partitions(service: CommandService, client: CommandClient) -> None:
    for _ in range(8):  # every partition gets a command, so each consumer works once
        reply = await client.send_command(
            OpenAccount(owner_id="p", currency="EUR"), uuid.uuid4(), timeout=30
        )
        assert reply.status == "accepted"


async def exercise_transfers(service: CommandService, client: CommandClient) -> None:
    source, target = uuid.uuid4(), uuid.uuid4()
    await client.send_command(OpenAccount(owner_id="t", currency="EUR", initial_deposit=9), source)
    await client.send_command(OpenAccount(owner_id="t", currency="EUR"), target)
    await client.send_command(
        RequestTransfer(from_account_id=source, to_account_id=target, amount=4), uuid.uuid4()
    )


async def exercise_replay(service: CommandService, client: CommandClient) -> None:
    connection = await aio_pika.connect(service.settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange(topology.REPLAY_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(ReplayRequest(reply_queue=queue.name).model_dump_json().encode()),
            routing_key=topology.REPLAY_REQUESTS_QUEUE,
        )
        async with asyncio.timeout(30):
            while (message := await queue.get(fail=False)) is None or (
                message.type != topology.REPLAY_FINISHED
            ):
                await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def nothing_more(service: CommandService, client: CommandClient) -> None:
    pass


# (what fails, the method made to fail, the task's name, what makes it work once more)
TASKS: dict[str, tuple[Any, str, Callable[[CommandService], str], Any]] = {
    "relay": (relay_module, "event_message", lambda s: "relay", exercise_relay),
    "process manager": (
        ProcessManagerRunner,
        "__call__",
        lambda s: "transfers",
        exercise_transfers,
    ),
    "partition consumer": (
        CommandConsumer,
        "_consume_queue",
        lambda s: topology.command_partition_queue(0),
        exercise_partitions,
    ),
    "lease loop": (PartitionLeases, "_rebalance", lambda s: "partition-leases", nothing_more),
    "replay server": (ReplayServer, "stream", lambda s: "replay-server", exercise_replay),
}


@pytest.mark.parametrize("kind", sorted(TASKS))
async def test_a_failing_task_is_restarted_counted_and_shown_in_readiness(
    kind: str,
    command_settings: CommandServiceSettings,
    broker: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, attribute, task_name, exercise = TASKS[kind]
    original = getattr(target, attribute)
    fault = Fault(first_partition if kind == "partition consumer" else lambda *args: True)
    if attribute == "event_message":  # what a publish of hostile content raised before

        def refuse(*args: Any, **kwargs: Any) -> Any:
            if not fault.healed:
                fault.hits += 1
                raise TypeError("string exceeds maximum length of 255 bytes")
            return original(*args, **kwargs)

        monkeypatch.setattr(target, attribute, refuse)
    else:
        monkeypatch.setattr(target, attribute, fault.around(original))
    supervisor = Supervisor(backoff=Backoff(initial=0.3, maximum=1.0))
    service = await start(command_settings, supervisor=supervisor)
    client = await CommandClient.connect(broker)
    try:
        assert service.http is not None
        name = task_name(service)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{service.http.port}", timeout=5
        ) as http:
            # Gives the task something to fail on; it finishes once the task works again.
            first = asyncio.create_task(exercise(service, client))

            async def readiness() -> dict[str, Any]:
                response = await http.get("/readyz")
                return {**response.json(), "code": response.status_code}

            failing_now = await eventually(
                readiness,
                lambda body: (
                    body["code"] == 503
                    and name in [t["task"] for t in body["checks"]["tasks"]["failing"]]
                ),
            )
            [entry] = [t for t in failing_now["checks"]["tasks"]["failing"] if t["task"] == name]
            assert entry["failures"] >= 3
            expected = "publish_failed" if kind == "relay" else None
            if expected is not None:
                assert entry["reason"] == expected
            assert "InjectedFailure" not in json.dumps(failing_now)  # codes, not exceptions
            samples = await scrape(http)
            assert value(samples, "cqrs_task_failures_total", task=name) >= 3

            fault.heal()
            await first
            await exercise(service, client)  # works once more after the restarts
            await eventually(readiness, lambda body: body["code"] == 200, timeout=40)
            if kind == "relay":  # and what failed was not skipped: everything got published
                status = (await http.get("/status")).json()
                assert status["relay"]["backlog"] == 0
    finally:
        await client.close()
        await service.stop()


async def test_a_failing_http_endpoint_is_restarted(
    command_settings: CommandServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = Fault(lambda *args: fault.hits < 2)
    monkeypatch.setattr(http_module._Server, "serve", fault.around(http_module._Server.serve))
    supervisor = Supervisor(backoff=Backoff(initial=0.1, maximum=0.3))
    service = await start(command_settings, supervisor=supervisor)
    try:
        assert service.http is not None
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{service.http.port}", timeout=5
        ) as http:
            assert (await http.get("/healthz")).status_code == 200
            samples = await scrape(http)
            assert value(samples, "cqrs_task_failures_total", task="http-endpoint") == 2
    finally:
        await service.stop()
