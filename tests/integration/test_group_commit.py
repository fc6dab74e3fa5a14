"""Group commit: a batch of commands decided in order and stored in one transaction, against
PostgreSQL; each command's outcome is what it would have been alone."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from typing import Any, cast

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage

from command_service.adapters.postgres_event_store import PostgresEventStore, read_all
from command_service.bootstrap import CommandService
from command_service.domains import ledger
from command_service.domains.ledger.account import Account
from command_service.domains.ledger.transfer import TransferProcess
from command_service.entrypoints.commands import CommandConsumer
from command_service.model.authorization import Actor
from command_service.service_layer.event_store import ConcurrencyError, NewEvent
from command_service.service_layer.handlers import (
    BatchCommand,
    handle_command,
    handle_commands,
)
from command_service.service_layer.process_managers import ProcessManagerRunner
from command_service.service_layer.registry import CommandRegistry
from command_service.service_layer.repository import AggregateRepository
from shared import topology
from shared.client import CommandClient, envelope_for
from shared.ledger import (
    DepositMoney,
    MoneyDeposited,
    OpenAccount,
    RequestTransfer,
    WithdrawMoney,
)
from shared.messages import Command, CommandEnvelope, Reply
from shared.topology import AGGREGATE_ID_HEADER
from tests.unit.test_command_consumer import FakeMessage, RecordingExchange

pytestmark = pytest.mark.integration

REGISTRY = CommandRegistry.from_domains([ledger.domain])
ANYONE = Actor.anonymous()


def command(envelope: CommandEnvelope) -> BatchCommand:
    return BatchCommand(REGISTRY.parse(envelope), ANYONE)


async def batch(store: PostgresEventStore, envelopes: Sequence[CommandEnvelope]) -> list[Reply]:
    return await handle_commands(
        [command(e) for e in envelopes], store=store, registry=REGISTRY, snapshot_every=3
    )


async def alone(store: PostgresEventStore, envelope: CommandEnvelope) -> Reply:
    return await handle_command(
        envelope, store=store, actor=ANYONE, registry=REGISTRY, concurrency_retries=3
    )


async def stored_reply(pool: asyncpg.Pool, command_id: uuid.UUID) -> dict[str, Any] | None:
    found = await pool.fetchval("SELECT reply FROM commands WHERE command_id = $1", command_id)
    return cast(dict[str, Any] | None, found)


def status(reply: Reply) -> tuple[str, str | None]:
    return reply.status, reply.error.code if reply.error else None


async def test_a_mixed_batch_gets_each_commands_own_outcome(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    known = uuid.uuid4()
    seen = envelope_for(OpenAccount(owner_id="o", currency="EUR"), known)
    assert (await alone(store, seen)).status == "accepted"
    before = await read_all(pool, 0, 100)
    account = uuid.uuid4()
    opened = envelope_for(OpenAccount(owner_id="o", currency="EUR", initial_deposit=10), account)
    deposit = envelope_for(DepositMoney(amount=5), account)
    too_much = envelope_for(WithdrawMoney(amount=1_000), account)
    withdraw = envelope_for(WithdrawMoney(amount=15), account)
    wrong_type = envelope_for(
        RequestTransfer(from_account_id=account, to_account_id=known, amount=1), account
    )
    on_known = envelope_for(DepositMoney(amount=2), known)
    envelopes = [opened, seen, deposit, too_much, deposit, wrong_type, withdraw, on_known]

    replies = await batch(store, envelopes)

    assert [status(r) for r in replies] == [
        ("accepted", None),
        ("duplicate", None),  # recorded before the batch
        ("accepted", None),  # sees the account opened earlier in the batch
        ("rejected", "insufficient_funds"),
        ("duplicate", None),  # repeated within the batch
        ("rejected", "wrong_aggregate_type"),
        ("accepted", None),  # the whole balance: 10 + 1 + 5 (opening deposit is an event)
        ("accepted", None),
    ]
    assert replies[4].version == replies[2].version
    events = (await read_all(pool, 0, 100))[len(before) :]
    positions = [e.position for e in events]
    assert positions == list(range(before[-1].position + 1, before[-1].position + 1 + len(events)))
    assert [(e.stream_id, e.version) for e in events] == [
        (account, 1),
        (account, 2),
        (account, 3),
        (account, 4),
        (known, 2),
    ]
    accepted = [r for r in replies if r.status == "accepted"]
    assert [r.position for r in accepted] == positions[1:]
    for envelope, reply in zip(envelopes, replies, strict=True):
        recorded = await stored_reply(pool, envelope.command_id)
        assert recorded is not None
        if reply.status != "duplicate":
            assert Reply.model_validate(recorded) == reply
    # Handled again (a redelivery after a crash between commit and ack): duplicates only.
    again = await batch(store, envelopes)
    assert {r.status for r in again} == {"duplicate"}
    assert [(r.command_id, r.version, r.position) for r in again] == [
        (r.command_id, r.version, r.position) for r in replies
    ]
    assert len(await read_all(pool, 0, 100)) == len(before) + len(events)


async def test_batch_snapshots_aggregates_that_crossed_the_interval(
    store: PostgresEventStore,
) -> None:
    account = uuid.uuid4()
    replies = await batch(
        store,
        [
            envelope_for(OpenAccount(owner_id="o", currency="EUR"), account),
            *(envelope_for(DepositMoney(amount=1), account) for _ in range(3)),
        ],
    )
    assert [r.version for r in replies] == [1, 2, 3, 4]
    snapshot = await store.load_snapshot(account)
    assert snapshot is not None and snapshot.version == 4
    [after] = await batch(store, [envelope_for(WithdrawMoney(amount=3), account)])
    assert (after.status, after.version) == ("accepted", 5)


async def test_a_stream_moved_by_another_writer_stores_nothing_of_the_batch(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    account, other = uuid.uuid4(), uuid.uuid4()
    for stream in (account, other):
        await alone(store, envelope_for(OpenAccount(owner_id="o", currency="EUR"), stream))
    commands = [
        envelope_for(DepositMoney(amount=1), other),
        envelope_for(DepositMoney(amount=2), account),
        envelope_for(WithdrawMoney(amount=99), other),
    ]
    moved = False
    original = store.append_batch

    async def racing(*args: Any, **kwargs: Any) -> list[Reply]:
        nonlocal moved
        if not moved:  # another writer commits between the batch's load and its commit
            moved = True
            await store.append(
                stream_id=account,
                aggregate_type="account",
                expected_version=1,
                events=[NewEvent.from_event(MoneyDeposited(amount=7))],
                command_id=uuid.uuid4(),
                correlation_id=None,
            )
        return await original(*args, **kwargs)

    store.append_batch = racing  # type: ignore[method-assign]
    last = (await read_all(pool, 0, 100))[-1].position
    with pytest.raises(ConcurrencyError):
        await batch(store, commands)
    assert [e.position for e in await read_all(pool, last, 100)] == [last + 1]  # the racer's
    for envelope in commands:
        assert await stored_reply(pool, envelope.command_id) is None


async def test_the_consumer_falls_back_to_one_at_a_time_on_a_conflict_or_a_poison_command(
    store: PostgresEventStore, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    decide = Account.decide

    def explode_on_13(self: Account, command: Command) -> Any:
        if isinstance(command, DepositMoney) and command.amount == 13:
            raise ZeroDivisionError("a bug in the domain")
        return decide(self, command)

    monkeypatch.setattr(Account, "decide", explode_on_13)
    replies, dead_letters = RecordingExchange(), RecordingExchange()
    consumer = CommandConsumer(
        connection=cast(AbstractConnection, None),
        prefetch=64,
        handle=functools.partial(
            handle_command, store=store, registry=REGISTRY, concurrency_retries=3
        ),
        handle_batch=functools.partial(handle_commands, store=store, registry=REGISTRY),
        batch_size=64,
        registry=REGISTRY,
        replies=cast(AbstractExchange, replies),
        dead_letters=cast(AbstractExchange, dead_letters),
        max_message_bytes=65_536,
    )
    account = uuid.uuid4()
    await alone(store, envelope_for(OpenAccount(owner_id="o", currency="EUR"), account))
    envelopes = [
        envelope_for(DepositMoney(amount=1), account),
        envelope_for(DepositMoney(amount=13), account),  # poison
        envelope_for(DepositMoney(amount=2), account),
        envelope_for(WithdrawMoney(amount=50), account),
    ]
    messages = [
        FakeMessage(
            body=e.model_dump_json().encode(),
            headers={AGGREGATE_ID_HEADER: str(e.aggregate_id)},
            message_id=str(e.command_id),
            reply_to="amq.gen-replies",
        )
        for e in envelopes
    ]

    await consumer.process_batch(cast(list[AbstractIncomingMessage], messages))

    answers = [Reply.model_validate_json(m.body) for m, _ in replies.published]
    assert [(a.command_id, *status(a)) for a in answers] == [
        (envelopes[0].command_id, "accepted", None),
        (envelopes[1].command_id, "rejected", "internal_error"),
        (envelopes[2].command_id, "accepted", None),
        (envelopes[3].command_id, "rejected", "insufficient_funds"),
    ]
    assert [a.version for a in answers] == [2, None, 3, None]
    assert len(dead_letters.published) == 1
    assert [m.settled for m in messages] == [[], [], [], ["ack multiple"]]
    events = await read_all(pool, 0, 100)
    assert [(e.stream_id, e.version) for e in events] == [(account, 1), (account, 2), (account, 3)]


async def test_a_process_manager_takes_a_page_of_reactions_in_batches(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    """Transfers that complete, one refused for want of funds (a follow-up step fails it), and
    one into a missing account (its debit is settled back): every page in one go, each page's
    steps in one transaction, money conserved; the same pages again change nothing."""
    handle = functools.partial(
        handle_command, store=store, registry=REGISTRY, concurrency_retries=3
    )
    batches: list[int] = []

    async def handle_batch(commands: Sequence[BatchCommand], *, internal: bool = False) -> Any:
        batches.append(len(commands))
        return await handle_commands(commands, store=store, registry=REGISTRY, internal=internal)

    runner = ProcessManagerRunner(
        TransferProcess(), handle=handle, handle_batch=handle_batch, registry=REGISTRY
    )
    rich, poor, target = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for account, balance in ((rich, 100), (poor, 5), (target, 0)):
        await alone(
            store,
            envelope_for(
                OpenAccount(owner_id="o", currency="EUR", initial_deposit=balance), account
            ),
        )
    transfers = {
        uuid.uuid4(): RequestTransfer(from_account_id=rich, to_account_id=target, amount=10),
        uuid.uuid4(): RequestTransfer(from_account_id=rich, to_account_id=target, amount=20),
        uuid.uuid4(): RequestTransfer(from_account_id=poor, to_account_id=target, amount=50),
        uuid.uuid4(): RequestTransfer(from_account_id=rich, to_account_id=uuid.uuid4(), amount=7),
    }
    for transfer_id, request in transfers.items():
        assert (await alone(store, envelope_for(request, transfer_id))).status == "accepted"

    async def run_pages() -> None:
        seen = 0
        while events := await store.read_all(seen, 500):
            await runner(events)
            seen = events[-1].position

    await run_pages()
    statuses = {}
    for transfer_id in transfers:
        history = await store.load_stream(transfer_id)
        statuses[transfer_id] = history[-1].type
    assert list(statuses.values()) == [
        "TransferCompleted",
        "TransferCompleted",
        "TransferFailed",
        "TransferFailed",
    ]
    repository = AggregateRepository(store, REGISTRY, 0)
    balances = [
        (await repository.load(Account, account)).balance for account in (rich, poor, target)
    ]
    assert balances == [70, 5, 30]
    assert max(batches) > 1
    count = len(await read_all(pool, 0, 1_000))
    await run_pages()  # after a crash before the checkpoint: duplicates only
    assert len(await read_all(pool, 0, 1_000)) == count
    source = await store.load_stream(rich)
    assert [e.type for e in source].count("MoneyDebitedForTransfer") == 3


async def test_the_service_takes_a_backlog_in_batches_and_answers_each_command(
    command_service: CommandService, client: CommandClient, broker: str
) -> None:
    accounts = [uuid.uuid4() for _ in range(6)]
    for account in accounts:
        opened = await client.send_command(OpenAccount(owner_id="o", currency="EUR"), account)
        assert opened.status == "accepted"
    deposits = [(account, amount) for amount in range(1, 31) for account in accounts]

    replies = await asyncio.gather(
        *(
            client.send_command(DepositMoney(amount=amount), account, timeout=60)
            for account, amount in deposits
        )
    )

    assert {r.status for r in replies} == {"accepted"}
    for account in accounts:
        versions = sorted(r.version or 0 for r in replies if r.aggregate_id == account)
        assert versions == list(range(2, 32))
    positions = sorted(r.position or 0 for r in replies)
    assert len(set(positions)) == len(positions)
    assert command_service.consumer.largest_batch > 1
    connection = await aio_pika.connect(broker)
    try:
        channel = await connection.channel()
        for index in range(command_service.settings.command_partitions):
            queue = await channel.declare_queue(
                topology.command_partition_queue(index), passive=True
            )
            assert queue.declaration_result.message_count == 0  # nothing left unacked
        dead = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
        assert dead.declaration_result.message_count == 0
    finally:
        await connection.close()
    after = await client.send_command(WithdrawMoney(amount=sum(range(1, 31))), accounts[0])
    assert (after.status, after.version) == ("accepted", 32)


async def test_a_writer_racing_the_batch_only_makes_the_consumer_go_one_at_a_time(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    """Another writer (a process manager, another replica during a handover) moves a stream
    between the batch's load and its commit: the commands are handled again one at a time,
    each against fresh state; no event lost or doubled."""
    replies = RecordingExchange()
    consumer = consumer_on(store, replies)
    account, other = uuid.uuid4(), uuid.uuid4()
    for stream in (account, other):
        await alone(store, envelope_for(OpenAccount(owner_id="o", currency="EUR"), stream))
    original = store.append_batch
    raced: list[uuid.UUID] = []

    async def racing(*args: Any, **kwargs: Any) -> list[Reply]:
        if not raced:
            racer = envelope_for(DepositMoney(amount=100), account)
            raced.append(racer.command_id)
            assert (await alone(store, racer)).status == "accepted"
        return await original(*args, **kwargs)

    store.append_batch = racing  # type: ignore[method-assign]
    envelopes = [
        envelope_for(DepositMoney(amount=1), other),
        envelope_for(WithdrawMoney(amount=50), account),  # needs the racer's deposit
        envelope_for(DepositMoney(amount=2), account),
    ]
    messages = [message_for(e) for e in envelopes]

    await consumer.process_batch(cast(list[AbstractIncomingMessage], messages))

    answers = [Reply.model_validate_json(m.body) for m, _ in replies.published]
    assert [(a.command_id, a.status, a.version) for a in answers] == [
        (envelopes[0].command_id, "accepted", 2),
        (envelopes[1].command_id, "accepted", 3),
        (envelopes[2].command_id, "accepted", 4),
    ]
    events = await read_all(pool, 0, 100)
    assert [(e.stream_id, e.version) for e in events] == [
        (account, 1),
        (other, 1),
        (account, 2),
        (other, 2),
        (account, 3),
        (account, 4),
    ]
    assert [m.settled for m in messages] == [[], [], ["ack multiple"]]


def consumer_on(store: PostgresEventStore, replies: RecordingExchange) -> CommandConsumer:
    return CommandConsumer(
        connection=cast(AbstractConnection, None),
        prefetch=64,
        handle=functools.partial(
            handle_command, store=store, registry=REGISTRY, concurrency_retries=3
        ),
        handle_batch=functools.partial(handle_commands, store=store, registry=REGISTRY),
        batch_size=64,
        registry=REGISTRY,
        replies=cast(AbstractExchange, replies),
        dead_letters=cast(AbstractExchange, RecordingExchange()),
        max_message_bytes=65_536,
    )


def message_for(envelope: CommandEnvelope) -> FakeMessage:
    return FakeMessage(
        body=envelope.model_dump_json().encode(),
        headers={AGGREGATE_ID_HEADER: str(envelope.aggregate_id)},
        message_id=str(envelope.command_id),
        reply_to="amq.gen-replies",
    )
