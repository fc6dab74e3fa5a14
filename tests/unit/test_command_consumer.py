"""The command consumer and the process managers on fakes: each command's payload is parsed
once; a batch is answered per command and acked at once, and nothing handed back is acked."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage

from command_service.domains import ledger
from command_service.domains.ledger.transfer import TransferProcess
from command_service.entrypoints.commands import CommandConsumer, PartitionPausedError
from command_service.model.authorization import Actor
from command_service.service_layer.event_store import EventStoreUnavailableError
from command_service.service_layer.handlers import handle_command, handle_commands
from command_service.service_layer.process_managers import ProcessManagerRunner
from command_service.service_layer.registry import CommandRegistry
from shared.client import envelope_for
from shared.ledger import DepositMoney, OpenAccount, RequestTransfer
from shared.messages import CommandEnvelope, Reply
from shared.topology import AGGREGATE_ID_HEADER
from tests.unit.fakes import FakeEventStore


@dataclass
class FakeMessage:
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = "application/json"
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    routing_key: str | None = None
    content_encoding: str | None = None
    timestamp: Any = None
    type: str | None = None
    app_id: str | None = None
    settled: list[str] = field(default_factory=list)

    async def ack(self, multiple: bool = False) -> None:
        self.settled.append("ack multiple" if multiple else "ack")


class RecordingExchange:
    def __init__(self) -> None:
        self.published: list[tuple[aio_pika.Message, str]] = []

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        self.published.append((message, routing_key))


class CountingRegistry(CommandRegistry):
    """Counts how often a command's payload is parsed."""

    parsed = 0

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        self.parsed += 1
        return super().parse(*args, **kwargs)


@pytest.fixture
def registry() -> CountingRegistry:
    counting = CountingRegistry()
    for aggregate in ledger.domain.aggregates:
        counting.register(aggregate)
    return counting


def consumer_for(
    registry: CommandRegistry, store: FakeEventStore, replies: RecordingExchange
) -> CommandConsumer:
    return CommandConsumer(
        connection=cast(AbstractConnection, None),
        prefetch=1,
        handle=functools.partial(
            handle_command, store=store, registry=registry, concurrency_retries=0
        ),
        registry=registry,
        replies=cast(AbstractExchange, replies),
        dead_letters=cast(AbstractExchange, RecordingExchange()),
        max_message_bytes=65_536,
    )


async def test_a_command_from_the_broker_is_parsed_once(registry: CountingRegistry) -> None:
    store, replies = FakeEventStore(), RecordingExchange()
    consumer = consumer_for(registry, store, replies)
    envelope = envelope_for(OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4())
    message = FakeMessage(
        body=envelope.model_dump_json().encode(),
        headers={AGGREGATE_ID_HEADER: str(envelope.aggregate_id)},
        message_id=str(envelope.command_id),
        reply_to="amq.gen-replies",
    )

    await consumer.process(cast(AbstractIncomingMessage, message))

    assert message.settled == ["ack"]
    [(published, _)] = replies.published
    assert Reply.model_validate_json(published.body).status == "accepted"
    assert registry.parsed == 1


async def test_a_process_managers_steps_are_not_parsed_again(registry: CountingRegistry) -> None:
    store = FakeEventStore()
    handle = functools.partial(
        handle_command, store=store, registry=registry, concurrency_retries=0
    )
    source, target = uuid.uuid4(), uuid.uuid4()
    for account, deposit in ((source, 10), (target, 0)):
        await handle(
            envelope_for(
                OpenAccount(owner_id="o", currency="EUR", initial_deposit=deposit), account
            ),
            actor=Actor.anonymous(),
        )
    await handle(
        envelope_for(
            RequestTransfer(from_account_id=source, to_account_id=target, amount=4), uuid.uuid4()
        ),
        actor=Actor.anonymous(),
    )
    parsed_by_clients = registry.parsed
    runner = ProcessManagerRunner(TransferProcess(), handle=handle, registry=registry)

    seen = 0
    while len(events := await store.read_all(seen, 100)) > 0:  # each step's events in turn
        await runner(events)
        seen = events[-1].position

    assert runner.issued == 4  # debit, credit, settle the debit, complete
    assert "TransferCompleted" in [event.type for event in store.events]
    assert registry.parsed == parsed_by_clients


def message_for(envelope: CommandEnvelope | None) -> FakeMessage:
    if envelope is None:
        return FakeMessage(body=b"{not json", reply_to="amq.gen-replies")
    return FakeMessage(
        body=envelope.model_dump_json().encode(),
        headers={AGGREGATE_ID_HEADER: str(envelope.aggregate_id)},
        message_id=str(envelope.command_id),
        reply_to="amq.gen-replies",
    )


class UnreachableStore(FakeEventStore):
    async def find_reply(self, *args: Any, **kwargs: Any) -> Any:
        raise EventStoreUnavailableError("down")

    async def find_replies(self, *args: Any, **kwargs: Any) -> Any:
        raise EventStoreUnavailableError("down")


def batch_consumer(
    registry: CommandRegistry, store: FakeEventStore, replies: RecordingExchange
) -> CommandConsumer:
    return CommandConsumer(
        connection=cast(AbstractConnection, None),
        prefetch=64,
        handle=functools.partial(
            handle_command, store=store, registry=registry, concurrency_retries=0
        ),
        handle_batch=functools.partial(handle_commands, store=store, registry=registry),
        batch_size=64,
        registry=registry,
        replies=cast(AbstractExchange, replies),
        dead_letters=cast(AbstractExchange, RecordingExchange()),
        max_message_bytes=65_536,
        transient_retry_seconds=0.05,
    )


async def test_a_batch_is_answered_in_order_and_acked_at_once(registry: CountingRegistry) -> None:
    replies = RecordingExchange()
    consumer = batch_consumer(registry, FakeEventStore(), replies)
    account = uuid.uuid4()
    envelopes = [
        envelope_for(OpenAccount(owner_id="o", currency="EUR"), account),
        None,  # bad input: dead-lettered, answered, acked with the others
        envelope_for(DepositMoney(amount=3), account),
    ]
    messages = [message_for(e) for e in envelopes]

    await consumer.process_batch(cast(list[AbstractIncomingMessage], messages))

    answers = [Reply.model_validate_json(m.body) for m, _ in replies.published]
    assert [(a.status, a.version) for a in answers] == [
        ("accepted", 1),
        ("rejected", None),
        ("accepted", 2),
    ]
    assert [m.settled for m in messages] == [[], [], ["ack multiple"]]
    assert consumer.largest_batch == 3


@pytest.mark.parametrize("bad_at", [0, 2])
async def test_commands_handed_back_in_an_outage_are_never_acked(
    registry: CountingRegistry, bad_at: int
) -> None:
    replies = RecordingExchange()
    consumer = batch_consumer(registry, UnreachableStore(), replies)
    envelopes: list[CommandEnvelope | None] = [
        envelope_for(DepositMoney(amount=1), uuid.uuid4()) for _ in range(2)
    ]
    envelopes.insert(bad_at, None)
    messages = [message_for(e) for e in envelopes]

    with pytest.raises(PartitionPausedError):
        await consumer.process_batch(cast(list[AbstractIncomingMessage], messages))

    # Only the bad one is settled (dead-lettered and acked on its own); the others come again.
    assert [m.settled for m in messages] == [["ack"] if i == bad_at else [] for i in range(3)]
    assert len(replies.published) == 1
