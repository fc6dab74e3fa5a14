"""Transfers through the running command service: completion, compensation, crash recovery."""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import TypeVar

import asyncpg
import pytest

from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.bootstrap import CommandService, start
from command_service.domains import ledger
from command_service.domains.ledger.account import Account
from command_service.domains.ledger.transfer import Transfer, TransferProcess
from command_service.model.authorization import Actor
from command_service.model.process import step_id
from command_service.service_layer.handlers import handle_command
from command_service.service_layer.process_managers import ProcessManagerRunner
from command_service.service_layer.registry import CommandRegistry
from command_service.settings import CommandServiceSettings
from shared.client import CommandClient, envelope_for
from shared.ledger import (
    ACCOUNT,
    CreditFromTransfer,
    DepositMoney,
    FreezeAccount,
    OpenAccount,
    RequestTransfer,
)

pytestmark = pytest.mark.integration


A = TypeVar("A", Account, Transfer)


async def load(store: PostgresEventStore, cls: type[A], id_: uuid.UUID) -> A:
    registry = CommandRegistry.from_domains([ledger.domain])
    history = await store.load_stream(id_)
    return cls.rehydrate(
        id_, [registry.event_from_stored(e.type, e.schema_version, e.data) for e in history]
    )


async def settled(store: PostgresEventStore, transfer_id: uuid.UUID) -> Transfer:
    async with asyncio.timeout(15):
        while True:
            transfer = await load(store, Transfer, transfer_id)
            if transfer.status in ("completed", "failed"):
                return transfer
            await asyncio.sleep(0.05)


async def open_account(client: CommandClient, balance: int, currency: str = "EUR") -> uuid.UUID:
    account = uuid.uuid4()
    reply = await client.send_command(
        OpenAccount(owner_id="o", currency=currency, initial_deposit=balance), account
    )
    assert reply.status == "accepted"
    return account


async def test_transfer_moves_money_and_completes(
    command_service: CommandService, client: CommandClient, store: PostgresEventStore
) -> None:
    a, b = await open_account(client, 100), await open_account(client, 5)
    transfer_id = uuid.uuid4()
    reply = await client.send_command(
        RequestTransfer(from_account_id=a, to_account_id=b, amount=30), transfer_id
    )
    assert reply.status == "accepted"
    assert (await settled(store, transfer_id)).status == "completed"
    source, target = await load(store, Account, a), await load(store, Account, b)
    assert (source.balance, target.balance) == (70, 35)
    assert source.pending_debits == {}


@pytest.mark.parametrize("obstacle", ["frozen", "currency"])
async def test_refused_credit_refunds_the_source_and_fails(
    obstacle: str,
    command_service: CommandService,
    client: CommandClient,
    store: PostgresEventStore,
) -> None:
    a = await open_account(client, 100)
    b = await open_account(client, 0, currency="USD" if obstacle == "currency" else "EUR")
    if obstacle == "frozen":
        assert (await client.send_command(FreezeAccount(), b)).status == "accepted"
    transfer_id = uuid.uuid4()
    await client.send_command(
        RequestTransfer(from_account_id=a, to_account_id=b, amount=40), transfer_id
    )
    transfer = await settled(store, transfer_id)
    assert transfer.status == "failed"
    source, target = await load(store, Account, a), await load(store, Account, b)
    assert (source.balance, target.balance) == (100, 0)
    assert source.pending_debits == {}
    types = [e.type for e in await store.load_stream(a)]
    assert types[-2:] == ["MoneyDebitedForTransfer", "TransferDebitRefunded"]


async def test_transfer_beyond_balance_fails_without_moving_money(
    command_service: CommandService, client: CommandClient, store: PostgresEventStore
) -> None:
    a, b = await open_account(client, 10), await open_account(client, 0)
    transfer_id = uuid.uuid4()
    await client.send_command(
        RequestTransfer(from_account_id=a, to_account_id=b, amount=11), transfer_id
    )
    assert (await settled(store, transfer_id)).status == "failed"
    assert [len(await store.load_stream(x)) for x in (a, b)] == [2, 1]


async def test_internal_steps_are_refused_from_the_broker(
    command_service: CommandService, client: CommandClient, store: PostgresEventStore
) -> None:
    a = await open_account(client, 0)
    reply = await client.send_command(
        CreditFromTransfer(
            transfer_id=uuid.uuid4(), amount=10**6, currency="EUR", from_account_id=a
        ),
        a,
    )
    assert reply.status == "rejected"
    assert reply.error is not None and reply.error.code == "unknown_command_type"
    assert (await load(store, Account, a)).balance == 0


async def test_a_client_cannot_claim_the_command_ids_of_a_transfers_steps(
    command_service: CommandService, client: CommandClient, store: PostgresEventStore
) -> None:
    """Step ids are uuid5 of a namespace in the source: a client can compute every one of its
    transfer's step ids before requesting it, and send its own commands under them first."""
    a, b = await open_account(client, 100), await open_account(client, 5)
    transfer_id = uuid.uuid4()
    steps = ("debit", "credit", "settle", "complete", "refund", "fail")
    for step in steps:
        claim = envelope_for(
            DepositMoney(amount=1), b, command_id=step_id(TransferProcess.name, transfer_id, step)
        )
        assert (await client.send(claim, ACCOUNT)).status == "accepted"
    reply = await client.send_command(
        RequestTransfer(from_account_id=a, to_account_id=b, amount=30), transfer_id
    )
    assert reply.status == "accepted"
    assert (await settled(store, transfer_id)).status == "completed"
    source, target = await load(store, Account, a), await load(store, Account, b)
    assert (source.balance, target.balance) == (70, 5 + len(steps) + 30)
    assert source.pending_debits == {}


async def test_a_transfer_that_died_half_way_is_finished_after_restart(
    command_settings: CommandServiceSettings, store: PostgresEventStore
) -> None:
    """The process manager crashed after debiting, before crediting or saving progress."""
    service = await start(command_settings)
    async with await CommandClient.connect(command_settings.amqp_url) as client:
        a, b = await open_account(client, 100), await open_account(client, 0)
    await service.stop()

    transfer_id = uuid.uuid4()
    registry = CommandRegistry.from_domains([ledger.domain])
    await handle_command(
        envelope_for(RequestTransfer(from_account_id=a, to_account_id=b, amount=25), transfer_id),
        store=store,
        actor=Actor.anonymous(),
        registry=registry,
        concurrency_retries=3,
    )
    # Run only the first reaction (the debit), as a process manager that then died would have.
    requested = [e for e in await store.read_all(0, 100) if e.type == "TransferRequested"]
    handle = functools.partial(
        handle_command, store=store, registry=registry, concurrency_retries=3
    )
    runner = ProcessManagerRunner(TransferProcess(), handle=handle, registry=registry)
    await runner(requested)
    assert (await load(store, Account, a)).balance == 75

    service = await start(command_settings)  # a replica picks it up from the checkpoint
    try:
        assert (await settled(store, transfer_id)).status == "completed"
    finally:
        await service.stop()
    source, target = await load(store, Account, a), await load(store, Account, b)
    assert (source.balance, target.balance) == (75, 25)
    debits = [e for e in await store.load_stream(a) if e.type == "MoneyDebitedForTransfer"]
    assert len(debits) == 1


async def test_a_step_recorded_before_the_key_spaces_is_not_decided_again(
    command_settings: CommandServiceSettings, store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    """A transfer in flight across the upgrade: its debit was recorded in the one command log
    the older code kept (as migration 0005 leaves it, and as an older replica still writes it
    during a rolling update); the process manager runs the step again after the upgrade."""
    registry = CommandRegistry.from_domains([ledger.domain])
    handle = functools.partial(
        handle_command, store=store, registry=registry, concurrency_retries=3
    )
    a, b, transfer_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for account, balance in ((a, 100), (b, 0)):
        await handle(
            envelope_for(
                OpenAccount(owner_id="o", currency="EUR", initial_deposit=balance), account
            ),
            actor=Actor.anonymous(),
        )
    await handle(
        envelope_for(RequestTransfer(from_account_id=a, to_account_id=b, amount=25), transfer_id),
        actor=Actor.anonymous(),
    )
    requested = [e for e in await store.read_all(0, 100) if e.type == "TransferRequested"]
    runner = ProcessManagerRunner(TransferProcess(), handle=handle, registry=registry)
    await runner(requested)
    assert (await load(store, Account, a)).balance == 75
    async with pool.acquire() as connection, connection.transaction():
        # The older code's statement, which leaves client_only to its default.
        await connection.execute(
            """INSERT INTO commands (command_id, aggregate_id, reply)
               SELECT command_id, aggregate_id, reply FROM internal_commands"""
        )
        await connection.execute("DELETE FROM internal_commands")

    await runner(requested)  # the same step once more, as after a restart
    service = await start(command_settings)  # and the whole transfer from the start
    try:
        assert (await settled(store, transfer_id)).status == "completed"
    finally:
        await service.stop()
    source, target = await load(store, Account, a), await load(store, Account, b)
    assert (source.balance, target.balance) == (75, 25)
    debits = [e for e in await store.load_stream(a) if e.type == "MoneyDebitedForTransfer"]
    assert len(debits) == 1
