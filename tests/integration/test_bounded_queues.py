"""`cqrs.commands.dead` and `cqrs.projector.parked` are bounded, each with its overflow policy.

- Dead letters are commands that were refused and answered: past the length or the bytes, the
  broker drops the oldest (`drop-head`), and the command consumer goes on.
- Parked events are accepted events a read model lacks: past a bound the broker refuses the park
  (`reject-publish`) and the projector keeps the event in its partition, retrying, until there is
  room. Nothing is dropped.
- A queue an older version declared without these bounds (or with others) does not stop a
  service from starting: it is used as it is, with a WARNING that says how to apply a policy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest
import structlog.testing
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, FieldValue
from pymongo.asynchronous.database import AsyncDatabase

from command_service.bootstrap import start
from command_service.settings import CommandServiceSettings
from cqrs_cli.dlq_command import list_dead_letters
from cqrs_cli.parked_command import drop_parked, list_parked, parked_count
from query_service.adapters.mongo import create_client
from query_service.bootstrap import start_projector
from query_service.projections.store import Document
from query_service.settings import QueryServiceSettings
from shared import topology
from shared.client import CommandClient
from shared.ledger import AccountOpened, OpenAccount
from shared.messages import Reply
from tests.conftest import Services
from tests.query_support import envelope, eventually, relay_message

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect_robust(broker)
    yield await connection.channel()
    await connection.close()


async def take(queue: aio_pika.abc.AbstractQueue, timeout: float = 10.0) -> AbstractIncomingMessage:
    async with asyncio.timeout(timeout):
        while (message := await queue.get(fail=False, no_ack=True)) is None:
            await asyncio.sleep(0.02)
    return message


async def send_bad(channel: AbstractChannel, body: bytes) -> str:
    """Publish a command that is not JSON; return its id once its rejection came back."""
    replies = await channel.declare_queue(f"cqrs.reply.{uuid.uuid4().hex}", exclusive=True)
    commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
    command_id = str(uuid.uuid4())
    await commands.publish(
        aio_pika.Message(body, message_id=command_id, reply_to=replies.name),
        routing_key="account.DepositMoney",
    )
    reply = Reply.model_validate_json((await take(replies)).body)
    assert reply.error is not None and reply.error.code == "invalid_envelope"
    return command_id


@pytest.mark.parametrize(
    ("bounds", "body_bytes", "kept"),
    [
        ({"dead_letter_max_messages": 3}, 10, 3),
        # 4 x 30,000 bytes over a bound of 65,536: the newest two fit.
        ({"dead_letter_max_bytes": 65_536, "max_message_bytes": 40_000}, 30_000, 2),
    ],
    ids=["length", "bytes"],
)
async def test_dead_letters_past_a_bound_drop_the_oldest_and_commands_keep_flowing(
    command_settings: CommandServiceSettings,
    channel: AbstractChannel,
    broker: str,
    bounds: dict[str, int],
    body_bytes: int,
    kept: int,
) -> None:
    service = await start(command_settings.model_copy(update=bounds))
    try:
        sent = [await send_bad(channel, b"{" + b"x" * (body_bytes - 1)) for _ in range(5)]
        waiting, letters = await list_dead_letters(broker, limit=10)
        assert waiting == kept
        assert [letter.command_id for letter in letters] == sent[-kept:]
        # The consumer settled every one and goes on.
        async with await CommandClient.connect(broker) as client:
            reply = await client.send_command(
                OpenAccount(owner_id="erin", currency="EUR"), uuid.uuid4()
            )
        assert reply.status == "accepted"
    finally:
        await service.stop()


@pytest.fixture
def query_settings(broker: str, services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=2,
        parked_retry_seconds=0.2,
    )


@pytest.fixture
async def database(
    query_settings: QueryServiceSettings,
) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(query_settings.mongo_url)
    yield client[query_settings.mongo_db]
    await client.close()


async def queued(broker: str, names: list[str]) -> int:
    """Messages in these queues, ready or delivered and not yet settled."""
    vhost = unquote(urlsplit(broker).path.lstrip("/")) or "/"
    run = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await run.communicate()
    counts = dict(line.split("\t") for line in out.decode().splitlines())
    return sum(int(counts[name]) for name in names)


@pytest.mark.parametrize(
    ("bounds", "body_bytes"),
    [
        ({"parked_max_messages": 2}, 20),
        # Two bodies of 400,000 bytes fit in 1 MiB; a third does not.
        ({"parked_max_bytes": 1_048_576}, 400_000),
    ],
    ids=["length", "bytes"],
)
async def test_a_full_parked_queue_refuses_and_the_event_waits_in_its_partition(
    query_settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    channel: AbstractChannel,
    broker: str,
    bounds: dict[str, int],
    body_bytes: int,
) -> None:
    runtime = await start_projector(query_settings.model_copy(update=bounds), database)
    connection = await aio_pika.connect_robust(broker)
    partitions = [topology.projector_partition_queue(index) for index in range(2)]
    try:
        exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE)
        events = [
            envelope(uuid.uuid4(), 1, AccountOpened(owner_id="o", currency="EUR")) for _ in range(3)
        ]
        for event in events:  # unreadable, so parked at once, and as large as the case wants
            body = b"{" + b"x" * (body_bytes - 1)
            await exchange.publish(relay_message(event, body=body), routing_key=event.routing_key)

        async def refused() -> int:
            return runtime.consumer.metrics.park_refused

        await eventually(refused, lambda count: count >= 2)  # refused, held, requeued, again
        parked = {str(p.message_id) for p in await list_parked(connection)}
        assert len(parked) == 2
        assert parked < {str(event.event_id) for event in events}
        assert await queued(broker, partitions) == 1  # the third waits in its partition
        assert runtime.consumer.metrics.parked == 2

        # Room again: the waiting event is parked on its next try. Nothing was lost.
        dropped = sorted(parked)[0]
        assert (await drop_parked(connection, message_ids={dropped})).moved == 1
        everyone_else = {str(event.event_id) for event in events} - {dropped}
        await eventually(
            lambda: list_parked(connection),
            lambda now: {p.message_id for p in now} == everyone_else,
        )
        assert await queued(broker, partitions) == 0
        assert await parked_count(connection) == 2
    finally:
        await connection.close()
        await runtime.stop(grace_seconds=5)


@pytest.mark.parametrize(
    "existing",
    [{}, {"x-max-length": 10}],
    ids=["declared-without-bounds", "declared-with-other-bounds"],
)
async def test_queues_declared_by_an_older_version_are_used_as_they_are_with_a_warning(
    command_settings: CommandServiceSettings,
    query_settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    channel: AbstractChannel,
    broker: str,
    existing: dict[str, FieldValue],
) -> None:
    for name in (topology.COMMAND_DEAD_LETTER_QUEUE, topology.PROJECTOR_PARKED_QUEUE):
        await channel.declare_queue(name, durable=True, arguments=existing or None)

    with structlog.testing.capture_logs() as logs:
        service = await start(command_settings)
        runtime = await start_projector(query_settings, database)
    try:
        warned = {
            entry["queue"]: entry for entry in logs if entry["event"] == "queue_bounds_not_applied"
        }
        assert set(warned) == {topology.COMMAND_DEAD_LETTER_QUEUE, topology.PROJECTOR_PARKED_QUEUE}
        assert all(entry["log_level"] == "warning" for entry in warned.values())
        fix = str(warned[topology.COMMAND_DEAD_LETTER_QUEUE]["fix"])
        assert fix.startswith("rabbitmqctl set_policy") and '"overflow":"drop-head"' in fix
        assert '"overflow":"reject-publish"' in str(warned[topology.PROJECTOR_PARKED_QUEUE]["fix"])

        # Both queues work as they are: a bad command is dead-lettered, an unreadable event parked.
        command_id = await send_bad(channel, b"{not json")
        waiting, letters = await list_dead_letters(broker, limit=10)
        assert (waiting, [letter.command_id for letter in letters]) == (1, [command_id])
        event = envelope(uuid.uuid4(), 1, AccountOpened(owner_id="o", currency="EUR"))
        exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE)
        await exchange.publish(relay_message(event, body=b"{"), routing_key=event.routing_key)
        connection = await aio_pika.connect_robust(broker)
        try:
            await eventually(
                lambda: list_parked(connection),
                lambda now: [p.message_id for p in now] == [str(event.event_id)],
            )
        finally:
            await connection.close()
    finally:
        await runtime.stop(grace_seconds=5)
        await service.stop()
