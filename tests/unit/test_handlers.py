"""The service layer's command handling, against the in-memory event store."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from command_service.domains import ledger
from command_service.model.authorization import Actor
from command_service.service_layer.handlers import BatchCommand, handle_command, handle_commands
from command_service.service_layer.registry import CommandRegistry, UnknownCommandError
from shared.client import envelope_for
from shared.ledger import (
    DebitForTransfer,
    DepositMoney,
    OpenAccount,
    RequestTransfer,
    WithdrawMoney,
)
from shared.messages import CommandEnvelope, Reply
from tests.unit.fakes import FakeEventStore

REGISTRY = CommandRegistry.from_domains([ledger.domain])
ANYONE = Actor.anonymous()


async def run(
    store: FakeEventStore, envelope: CommandEnvelope, retries: int = 3, *, internal: bool = False
) -> Reply:
    return await handle_command(
        envelope,
        store=store,
        actor=Actor.anonymous(),
        registry=CommandRegistry.from_domains([ledger.domain]),
        concurrency_retries=retries,
        internal=internal,
    )


@pytest.fixture
def store() -> FakeEventStore:
    return FakeEventStore()


async def open_account(store: FakeEventStore, balance: int = 0) -> uuid.UUID:
    account = uuid.uuid4()
    reply = await run(
        store,
        envelope_for(OpenAccount(owner_id="o", currency="EUR", initial_deposit=balance), account),
    )
    assert reply.status == "accepted"
    return account


async def test_accepted_reply_carries_version_and_position(store: FakeEventStore) -> None:
    account = await open_account(store, balance=100)
    reply = await run(store, envelope_for(DepositMoney(amount=5), account))
    assert (reply.status, reply.version, reply.position) == ("accepted", 3, 3)


async def test_resent_command_appends_nothing_and_answers_duplicate(
    store: FakeEventStore,
) -> None:
    account = await open_account(store)
    envelope = envelope_for(DepositMoney(amount=5), account)
    first = await run(store, envelope)
    again = await run(store, envelope)
    assert again.status == "duplicate"
    assert (again.version, again.position) == (first.version, first.position)
    assert len(store.events) == 2


async def test_resent_rejected_command_gets_the_same_rejection(store: FakeEventStore) -> None:
    account = await open_account(store)
    envelope = envelope_for(WithdrawMoney(amount=5), account)
    first = await run(store, envelope)
    store.events.append(store.events[0])  # any later change must not alter the stored answer
    again = await run(store, envelope)
    assert first.error is not None and first.error.code == "insufficient_funds"
    assert again.status == "duplicate" and again.error == first.error


async def test_rejects_stale_expected_version(store: FakeEventStore) -> None:
    account = await open_account(store, balance=10)
    reply = await run(store, envelope_for(DepositMoney(amount=1), account, expected_version=1))
    assert reply.status == "rejected"
    assert reply.error is not None and reply.error.code == "concurrency_conflict"


async def test_accepts_matching_expected_version(store: FakeEventStore) -> None:
    account = await open_account(store, balance=10)
    reply = await run(store, envelope_for(DepositMoney(amount=1), account, expected_version=2))
    assert (reply.status, reply.version) == ("accepted", 3)


async def test_lost_race_is_retried_against_fresh_state(store: FakeEventStore) -> None:
    account = await open_account(store)
    store.conflicts_to_inject = 2
    reply = await run(store, envelope_for(DepositMoney(amount=1), account), retries=3)
    assert reply.status == "accepted"


async def test_gives_up_after_bounded_retries(store: FakeEventStore) -> None:
    account = await open_account(store)
    store.conflicts_to_inject = 10
    reply = await run(store, envelope_for(DepositMoney(amount=1), account), retries=2)
    assert reply.error is not None and reply.error.code == "concurrency_conflict"
    assert store.conflicts_to_inject == 7  # three attempts, no more


async def test_unknown_type_and_bad_payload_raise(store: FakeEventStore) -> None:
    account = uuid.uuid4()
    with pytest.raises(UnknownCommandError):
        await run(store, CommandEnvelope(type="Teleport", aggregate_id=account))
    with pytest.raises(ValidationError):
        await run(
            store,
            CommandEnvelope(type="DepositMoney", aggregate_id=account, payload={"amount": -1}),
        )
    assert store.events == []


async def test_rejects_a_transfer_under_an_accounts_id(store: FakeEventStore) -> None:
    account, other = await open_account(store, balance=50), await open_account(store)
    envelope = envelope_for(
        RequestTransfer(from_account_id=account, to_account_id=other, amount=10), account
    )
    reply = await run(store, envelope)
    assert reply.status == "rejected"
    assert reply.error is not None and reply.error.code == "wrong_aggregate_type"
    again = await run(store, envelope)
    assert (again.status, again.error) == ("duplicate", reply.error)
    assert [e.aggregate_type for e in store.events] == ["account"] * 3


async def test_rejects_opening_an_account_under_a_transfers_id(store: FakeEventStore) -> None:
    account, other = await open_account(store, balance=50), await open_account(store)
    transfer = uuid.uuid4()
    requested = await run(
        store,
        envelope_for(
            RequestTransfer(from_account_id=account, to_account_id=other, amount=10), transfer
        ),
    )
    assert requested.status == "accepted"
    reply = await run(
        store, envelope_for(OpenAccount(owner_id="m", currency="EUR", initial_deposit=5), transfer)
    )
    assert reply.error is not None and reply.error.code == "wrong_aggregate_type"
    assert [e.type for e in await store.load_stream(transfer)] == ["TransferRequested"]


async def test_a_first_append_that_loses_to_another_type_is_rejected() -> None:
    """Another type's first append commits between this command's load and its append."""

    class RacingStore(FakeEventStore):
        async def append(self, **fields: Any) -> Reply:
            if fields["stream_id"] not in self.stream_types:
                await super().append(
                    **{**fields, "aggregate_type": "transfer", "command_id": uuid.uuid4()}
                )
            return await super().append(**fields)

    store = RacingStore()
    account = uuid.uuid4()
    reply = await run(store, envelope_for(OpenAccount(owner_id="o", currency="EUR"), account))
    assert reply.error is not None and reply.error.code == "wrong_aggregate_type"
    assert [e.aggregate_type for e in store.events] == ["transfer"]


async def test_the_stores_refusal_of_another_type_is_a_rejection(store: FakeEventStore) -> None:
    """The store knows a stream's type even where the loaded history shows none of it."""
    account = uuid.uuid4()
    store.stream_types[account] = "transfer"
    reply = await run(store, envelope_for(OpenAccount(owner_id="o", currency="EUR"), account))
    assert reply.error is not None and reply.error.code == "wrong_aggregate_type"
    assert store.events == []


async def test_a_client_command_under_a_steps_id_does_not_answer_the_step(
    store: FakeEventStore,
) -> None:
    account = await open_account(store, balance=50)
    step = uuid.uuid4()
    claim = envelope_for(DepositMoney(amount=1), account, command_id=step)
    claimed = await run(store, claim)
    debit = envelope_for(
        DebitForTransfer(transfer_id=uuid.uuid4(), amount=10, to_account_id=uuid.uuid4()),
        account,
        command_id=step,
    )
    decided = await run(store, debit, internal=True)
    assert (decided.status, decided.version) == ("accepted", 4)
    # Each key space answers its own resends.
    again = await run(store, debit, internal=True)
    assert (again.status, again.version) == ("duplicate", 4)
    resent = await run(store, claim)
    assert (resent.status, resent.version) == ("duplicate", claimed.version)
    assert [e.type for e in store.events[-2:]] == ["MoneyDeposited", "MoneyDebitedForTransfer"]


def batch_item(envelope: CommandEnvelope, actor: Actor = ANYONE) -> BatchCommand:
    return BatchCommand(REGISTRY.parse(envelope), actor)


def answer(reply: Reply) -> tuple[Any, ...]:
    return (reply.command_id, reply.status, reply.version, reply.position, reply.error)


@pytest.mark.parametrize("seed", range(20))
async def test_a_batch_answers_and_stores_as_its_commands_one_after_the_other(seed: int) -> None:
    """Random mixes (opens, deposits, withdrawals beyond the balance, transfers under an
    account's id, resent and repeated command ids, expected versions): the same replies and
    the same stored events and answers as `handle_command` one command at a time."""
    rng = random.Random(seed)
    accounts = [uuid.uuid4() for _ in range(4)]
    envelopes: list[CommandEnvelope] = []
    for _ in range(40):
        account = rng.choice(accounts)
        pick = rng.random()
        if envelopes and pick < 0.1:
            envelopes.append(rng.choice(envelopes))  # a command id seen before
            continue
        command: Any
        if pick < 0.3:
            command = OpenAccount(owner_id="o", currency="EUR", initial_deposit=rng.randint(0, 9))
        elif pick < 0.6:
            command = DepositMoney(amount=rng.randint(1, 9))
        elif pick < 0.85:
            command = WithdrawMoney(amount=rng.randint(1, 20))
        else:
            command = RequestTransfer(from_account_id=account, to_account_id=uuid.uuid4(), amount=1)
        expected = rng.choice([None, None, None, rng.randint(0, 4)])
        envelopes.append(envelope_for(command, account, expected_version=expected))
    split = rng.randint(0, 10)  # some handled before the batch: their resends are duplicates
    one_by_one, batched = FakeEventStore(), FakeEventStore()
    for envelope in envelopes[:split]:
        await run(one_by_one, envelope)
        await run(batched, envelope)

    alone = [await run(one_by_one, envelope) for envelope in envelopes[split:]]
    together = await handle_commands(
        [batch_item(envelope) for envelope in envelopes[split:]], store=batched, registry=REGISTRY
    )

    assert [answer(r) for r in together] == [answer(r) for r in alone]
    assert [(e.position, e.stream_id, e.version, e.type, e.data) for e in batched.events] == [
        (e.position, e.stream_id, e.version, e.type, e.data) for e in one_by_one.events
    ]
    assert batched.replies == one_by_one.replies
