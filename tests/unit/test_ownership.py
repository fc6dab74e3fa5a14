"""The ledger's owner policy, through the service layer's command handling (in-memory store).

The same rules run against the real broker with two client logins in
tests/integration/test_authorization.py; here each rule and the framework's hook are pinned down.
"""

from __future__ import annotations

import uuid

import pytest

from command_service.bootstrap import build_policy
from command_service.domains import ledger
from command_service.domains.ledger.account import Account
from command_service.model.aggregate import Aggregate, DomainError
from command_service.model.authorization import Actor, AggregateLoader, Forbidden
from command_service.service_layer.access_control import authorization
from command_service.service_layer.handlers import BatchCommand, handle_command, handle_commands
from command_service.service_layer.registry import CommandRegistry
from command_service.settings import CommandServiceSettings
from shared.client import envelope_for
from shared.ledger import (
    CloseAccount,
    CreditFromTransfer,
    DepositMoney,
    FreezeAccount,
    OpenAccount,
    RequestTransfer,
    UnfreezeAccount,
    WithdrawMoney,
)
from shared.messages import Command, CommandEnvelope, CommandMetadata, Reply
from tests.unit.fakes import FakeEventStore

ALICE, BOB, ADMIN = Actor.user("alice"), Actor.user("bob"), Actor.user("cqrs-admin")
POLICY = authorization([ledger.domain], privileged={"cqrs-admin"})


async def run(
    store: FakeEventStore,
    envelope: CommandEnvelope,
    actor: Actor,
    *,
    internal: bool = False,
) -> Reply:
    return await handle_command(
        envelope,
        store=store,
        actor=actor,
        registry=CommandRegistry.from_domains([ledger.domain]),
        concurrency_retries=1,
        internal=internal,
        authorize=POLICY,
    )


def code(reply: Reply) -> str | None:
    return reply.error.code if reply.error else None


@pytest.fixture
def store() -> FakeEventStore:
    return FakeEventStore()


async def opened(store: FakeEventStore, owner: Actor = ALICE, deposit: int = 100) -> uuid.UUID:
    account = uuid.uuid4()
    assert owner.name is not None
    command = OpenAccount(owner_id=owner.name, currency="EUR", initial_deposit=deposit)
    reply = await run(store, envelope_for(command, account), owner)
    assert reply.status == "accepted", reply
    return account


@pytest.mark.parametrize(
    ("command", "outcome"),
    [
        (DepositMoney(amount=1), None),
        (WithdrawMoney(amount=1), None),
        (FreezeAccount(), None),
        # Allowed, and then decided by the account: the policy adds no answer of its own.
        (CloseAccount(), "balance_not_zero"),
    ],
    ids=lambda c: c.type_name() if isinstance(c, Command) else str(c),
)
async def test_the_owner_acts_on_its_account_and_its_name_is_stored(
    command: Command, outcome: str | None, store: FakeEventStore
) -> None:
    account = await opened(store)
    reply = await run(store, envelope_for(command, account), ALICE)
    assert code(reply) == outcome
    assert {event.metadata["user"] for event in store.events} == {"alice"}


@pytest.mark.parametrize(
    "command",
    [
        DepositMoney(amount=1),
        WithdrawMoney(amount=1),
        FreezeAccount(),
        UnfreezeAccount(),
        CloseAccount(),
    ],
    ids=lambda c: c.type_name(),
)
async def test_rejects_a_command_on_another_clients_account_as_forbidden(
    command: Command, store: FakeEventStore
) -> None:
    account = await opened(store)
    envelope = envelope_for(command, account)
    reply = await run(store, envelope, BOB)
    assert (reply.status, code(reply)) == ("rejected", "forbidden")
    assert len(store.events) == 2
    # Stored like any rejection: the resend is a duplicate with the same answer.
    assert store.replies[envelope.command_id] == reply
    again = await run(store, envelope, BOB)
    assert (again.status, again.error) == ("duplicate", reply.error)


async def test_a_command_on_an_account_that_does_not_exist_answers_as_without_a_policy(
    store: FakeEventStore,
) -> None:
    reply = await run(store, envelope_for(WithdrawMoney(amount=1), uuid.uuid4()), BOB)
    assert code(reply) == "account_not_found"


async def test_a_client_opens_an_account_only_for_itself(store: FakeEventStore) -> None:
    account = uuid.uuid4()
    for_alice = OpenAccount(owner_id="alice", currency="EUR")
    reply = await run(store, envelope_for(for_alice, account), BOB)
    assert code(reply) == "forbidden"
    assert store.events == []
    # Its own owner id on an account that exists: the account answers, as without a policy.
    taken = await opened(store)
    mine = OpenAccount(owner_id="bob", currency="EUR")
    assert code(await run(store, envelope_for(mine, taken), BOB)) == "account_exists"


async def test_a_transfer_only_out_of_an_account_the_client_owns(store: FakeEventStore) -> None:
    alices, bobs = await opened(store), await opened(store, BOB, deposit=0)
    theft = RequestTransfer(from_account_id=alices, to_account_id=bobs, amount=5)
    assert code(await run(store, envelope_for(theft, uuid.uuid4()), BOB)) == "forbidden"
    # A source that does not exist, or that is not an account, belongs to nobody.
    transfer = uuid.uuid4()
    payment = RequestTransfer(from_account_id=bobs, to_account_id=alices, amount=5)
    assert (await run(store, envelope_for(payment, transfer), BOB)).status == "accepted"
    for source in (uuid.uuid4(), transfer):
        nowhere = RequestTransfer(from_account_id=source, to_account_id=alices, amount=5)
        assert code(await run(store, envelope_for(nowhere, uuid.uuid4()), BOB)) == "forbidden"
    assert [e.metadata["user"] for e in await store.load_stream(transfer)] == ["bob"]


async def test_a_privileged_login_may_do_anything(store: FakeEventStore) -> None:
    account = await opened(store)
    for command in (WithdrawMoney(amount=5), FreezeAccount()):
        assert (await run(store, envelope_for(command, account), ADMIN)).status == "accepted"
    other = uuid.uuid4()
    for_alice = OpenAccount(owner_id="alice", currency="EUR")
    assert (await run(store, envelope_for(for_alice, other), ADMIN)).status == "accepted"
    assert [e.metadata["user"] for e in store.events] == ["alice", "alice"] + ["cqrs-admin"] * 3


async def test_an_anonymous_command_is_forbidden(store: FakeEventStore) -> None:
    account = await opened(store)
    reply = await run(store, envelope_for(DepositMoney(amount=1), account), Actor.anonymous())
    assert code(reply) == "forbidden"
    assert len(store.events) == 2


async def test_process_steps_are_allowed_and_named(store: FakeEventStore) -> None:
    account = await opened(store)
    step = CreditFromTransfer(
        transfer_id=uuid.uuid4(), amount=5, currency="EUR", from_account_id=uuid.uuid4()
    )
    reply = await run(store, envelope_for(step, account), Actor.process("transfers"), internal=True)
    assert reply.status == "accepted"
    assert store.events[-1].metadata["user"] == "process:transfers"


async def test_the_envelopes_user_is_not_the_sender(store: FakeEventStore) -> None:
    account = await opened(store)
    claim = envelope_for(DepositMoney(amount=1), account).model_copy(
        update={"metadata": CommandMetadata(user="alice")}
    )
    assert code(await run(store, claim, BOB)) == "forbidden"


async def test_the_policy_sees_the_loaded_aggregate_before_it_decides(
    store: FakeEventStore,
) -> None:
    account = await opened(store)
    seen: list[tuple[Actor, str, int]] = []

    async def refuse_with_a_code_of_its_own(
        actor: Actor, command: Command, aggregate: Aggregate, load: AggregateLoader
    ) -> None:
        seen.append((actor, command.type_name(), aggregate.version))
        loaded = await load(Account, account)
        assert loaded is not None and loaded.balance == 100
        assert await load(Account, uuid.uuid4()) is None
        raise DomainError("over_limit", "not today")

    # Withdrawing 1,000 would be `insufficient_funds`: the policy answers first.
    reply = await handle_command(
        envelope_for(WithdrawMoney(amount=1_000), account),
        store=store,
        actor=BOB,
        registry=CommandRegistry.from_domains([ledger.domain]),
        concurrency_retries=0,
        authorize=refuse_with_a_code_of_its_own,
    )
    assert seen == [(BOB, "WithdrawMoney", 2)]
    assert code(reply) == "over_limit"
    assert len(store.events) == 2


def test_the_setting_chooses_the_policy() -> None:
    assert build_policy(CommandServiceSettings(authorization="off"), [ledger.domain]) is None
    assert build_policy(CommandServiceSettings(), [ledger.domain]) is not None
    listed = CommandServiceSettings(privileged_users=" ops , cqrs-admin,, ")
    assert listed.privileged == {"ops", "cqrs-admin"}
    assert CommandServiceSettings().privileged == {"cqrs-command", "cqrs-admin"}


def test_forbidden_is_a_domain_error_with_its_code() -> None:
    error = Forbidden("no")
    assert (error.code, error.message) == ("forbidden", "no")


async def test_in_a_batch_the_policy_sees_what_the_batch_did_before() -> None:
    """Each command of a batch is authorized as it would be after the ones before it: an
    account opened earlier in the batch is its owner's to transfer out of, and nobody else's;
    the same batch one command at a time answers the same."""
    sources = {ALICE: uuid.uuid4(), BOB: uuid.uuid4()}
    target = uuid.uuid4()
    commands = [
        (
            envelope_for(
                OpenAccount(owner_id="alice", currency="EUR", initial_deposit=50), sources[ALICE]
            ),
            ALICE,
        ),
        (
            envelope_for(
                RequestTransfer(from_account_id=sources[ALICE], to_account_id=target, amount=5),
                uuid.uuid4(),
            ),
            ALICE,
        ),
        (
            envelope_for(
                RequestTransfer(from_account_id=sources[ALICE], to_account_id=target, amount=5),
                uuid.uuid4(),
            ),
            BOB,
        ),
        (envelope_for(DepositMoney(amount=1), sources[ALICE]), BOB),
        (
            envelope_for(
                RequestTransfer(from_account_id=sources[BOB], to_account_id=target, amount=5),
                uuid.uuid4(),
            ),
            BOB,
        ),
        (envelope_for(OpenAccount(owner_id="bob", currency="EUR"), sources[BOB]), BOB),
        (
            envelope_for(
                RequestTransfer(from_account_id=sources[BOB], to_account_id=target, amount=5),
                uuid.uuid4(),
            ),
            BOB,
        ),
    ]
    registry = CommandRegistry.from_domains([ledger.domain])
    together = await handle_commands(
        [BatchCommand(registry.parse(envelope), actor) for envelope, actor in commands],
        store=FakeEventStore(),
        registry=registry,
        authorize=POLICY,
    )
    one_by_one = FakeEventStore()
    alone = [await run(one_by_one, envelope, actor) for envelope, actor in commands]

    assert [(r.status, code(r)) for r in together] == [
        ("accepted", None),
        ("accepted", None),
        ("rejected", "forbidden"),
        ("rejected", "forbidden"),
        ("rejected", "forbidden"),  # bob's account does not exist yet
        ("accepted", None),
        ("accepted", None),
    ]
    assert [(r.status, code(r), r.version) for r in together] == [
        (r.status, code(r), r.version) for r in alone
    ]
