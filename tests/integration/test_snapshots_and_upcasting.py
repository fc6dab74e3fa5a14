"""Snapshots of long streams and upcasting of events stored under an older schema."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.domains import ledger
from command_service.domains.ledger.account import Account
from command_service.model.aggregate import Aggregate
from command_service.model.authorization import Actor
from command_service.service_layer.event_store import NewEvent, Snapshot
from command_service.service_layer.handlers import handle_command
from command_service.service_layer.registry import CommandRegistry
from command_service.service_layer.repository import AggregateRepository
from shared.client import envelope_for
from shared.ledger import DepositMoney, OpenAccount
from shared.messages import Command, Event

pytestmark = pytest.mark.integration

REGISTRY = CommandRegistry.from_domains([ledger.domain])


async def deposit_many(
    store: PostgresEventStore, account: uuid.UUID, count: int, every: int
) -> None:
    registry = CommandRegistry.from_domains([ledger.domain])
    commands: list[Command] = [OpenAccount(owner_id="o", currency="EUR")]
    commands += [DepositMoney(amount=i + 1) for i in range(count)]
    for command in commands:
        reply = await handle_command(
            envelope_for(command, account),
            store=store,
            actor=Actor.anonymous(),
            registry=registry,
            concurrency_retries=0,
            snapshot_every=every,
        )
        assert reply.status == "accepted"


async def test_a_snapshot_is_taken_every_n_versions_and_loading_starts_from_it(
    store: PostgresEventStore,
) -> None:
    account = uuid.uuid4()
    await deposit_many(store, account, count=11, every=5)  # versions 1..12
    snapshot = await store.load_snapshot(account)
    assert snapshot is not None
    assert (snapshot.version, snapshot.schema_version) == (10, Account.snapshot_schema)
    assert snapshot.state["balance"] == sum(range(1, 10))

    repository = AggregateRepository(store, REGISTRY, snapshot_every=5)
    loaded = await repository.load(Account, account)
    replayed = await AggregateRepository(store, REGISTRY, snapshot_every=0).load(Account, account)
    assert isinstance(loaded, Account) and isinstance(replayed, Account)
    assert (loaded.version, loaded.balance) == (replayed.version, replayed.balance) == (12, 66)


async def test_loading_uses_the_snapshot_rather_than_the_events_before_it(
    store: PostgresEventStore,
) -> None:
    account = uuid.uuid4()
    await deposit_many(store, account, count=4, every=5)  # snapshot at version 5
    snapshot = await store.load_snapshot(account)
    assert snapshot is not None and snapshot.version == 5
    # A snapshot saying otherwise wins over the events it covers: proof they are not read.
    await store.save_snapshot(
        Snapshot(
            account, "account", 6, snapshot.schema_version, {**snapshot.state, "balance": 1000}
        )
    )
    loaded = await AggregateRepository(store, REGISTRY, 5).load(Account, account)
    assert isinstance(loaded, Account)
    assert (loaded.version, loaded.balance) == (6, 1000)


async def test_a_snapshot_of_an_older_state_shape_is_ignored(store: PostgresEventStore) -> None:
    account = uuid.uuid4()
    await deposit_many(store, account, count=4, every=0)
    await store.save_snapshot(Snapshot(account, "account", 5, 0, {"shape": "old"}))
    loaded = await AggregateRepository(store, REGISTRY, 5).load(Account, account)
    assert isinstance(loaded, Account)
    assert (loaded.version, loaded.balance) == (5, 10)


class Renamed(Event):
    """Version 2 splits the name that version 1 stored as one string."""

    schema_version = 2
    first: str
    last: str


class Rename(Command):
    aggregate_type = "person"


class Person(Aggregate):
    aggregate_type = "person"
    commands = (Rename,)
    events = (Renamed,)

    def __init__(self, aggregate_id: uuid.UUID) -> None:
        super().__init__(aggregate_id)
        self.names: list[tuple[str, str]] = []

    def apply(self, event: Event) -> None:
        assert isinstance(event, Renamed)
        self.names.append((event.first, event.last))

    def decide(self, command: Command) -> Sequence[Event]:
        return []


def split_name(data: dict[str, Any]) -> dict[str, Any]:
    first, _, last = data["name"].partition(" ")
    return {"first": first, "last": last}


async def test_an_event_stored_as_v1_is_read_back_as_v2(store: PostgresEventStore) -> None:
    person = uuid.uuid4()
    await store.append(
        stream_id=person,
        aggregate_type="person",
        expected_version=0,
        events=[NewEvent(uuid.uuid4(), "Renamed", 1, {"name": "Ada Lovelace"})],
        command_id=uuid.uuid4(),
        correlation_id=None,
    )
    registry = CommandRegistry()
    registry.register(Person)
    registry.register_upcaster("Renamed", 1, split_name)
    loaded = await AggregateRepository(store, registry, 0).load(Person, person)
    assert isinstance(loaded, Person)
    assert loaded.names == [("Ada", "Lovelace")]
    [stored] = await store.load_stream(person)
    assert (stored.schema_version, stored.data) == (1, {"name": "Ada Lovelace"})  # never rewritten
