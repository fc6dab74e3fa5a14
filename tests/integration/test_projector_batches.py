"""The projector's micro-batches on the real MongoDB-compatible server and RabbitMQ.

A batch of events is written per projection in few round trips (each document's events folded
into one write) and ends in the state projecting the events one at a time gives; each event of
the batch keeps its own outcome (applied, duplicate, parked for a gap, an invalid event or a
projection that fails), and a lone delivery is projected without waiting for company.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Sequence
from uuid import uuid4

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import (
    CHECKPOINTS_COLLECTION,
    MongoCheckpoints,
    WriteCounter,
    create_client,
)
from query_service.bootstrap import ProjectorRuntime, start_projector
from query_service.projections.base import ApplyResult
from query_service.projections.store import Document
from query_service.service_layer.catalog import ReadModelCatalog
from query_service.service_layer.projector import (
    GapPolicy,
    Outcome,
    Projected,
    Projector,
    Rejected,
    Targets,
)
from query_service.service_layer.rebuild import (
    Rebuild,
    RebuildPolicy,
    ReplayEvents,
    ReplayFinished,
    ReplayItem,
    ReplayStarted,
)
from query_service.settings import QueryServiceSettings
from shared.ledger import (
    TRANSFER,
    AccountFrozen,
    MoneyDeposited,
    MoneyWithdrawn,
    TransferCompleted,
    TransferRequested,
)
from shared.messages import EventEnvelope, ReplayProgress
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Services
from tests.query_support import envelope, eventually, opened_account, publish
from tests.read_model_support import (
    differences,
    ledger_catalog,
    reference_snapshot,
    scratch_database,
    snapshot,
)

pytestmark = pytest.mark.integration

NO_WAIT = GapPolicy(attempts=2, delay_seconds=0)
READ_MODEL_COLLECTIONS = ("accounts", "owner_accounts", "transactions", "transaction_heads")


class Counted:
    """A database whose client counts its write round trips per collection."""

    def __init__(self, database: AsyncDatabase[Document], writes: collections.Counter[str]):
        self.database = database
        self.writes = writes

    def read_model_writes(self) -> dict[str, int]:
        return {name: self.writes[name] for name in (*READ_MODEL_COLLECTIONS, "transfers")}


@pytest.fixture
async def counted(services: Services, mongo_db: str) -> AsyncIterator[Counted]:
    writes: collections.Counter[str] = collections.Counter()
    client = create_client(services.mongo_url, listeners=[WriteCounter(writes)])
    try:
        yield Counted(client[mongo_db], writes)
    finally:
        await client.drop_database(mongo_db)
        await client.close()


def projector_over(catalog: ReadModelCatalog) -> Projector:
    checkpoints = MongoCheckpoints(catalog.database[CHECKPOINTS_COLLECTION])
    return Projector(catalog, checkpoints=checkpoints, gap_policy=NO_WAIT)


def account_history(*, deposits: int) -> list[EventEnvelope]:
    account = uuid4()
    history = opened_account(account, deposit=100)
    version = len(history)
    for amount in range(1, deposits + 1):
        version += 1
        history.append(envelope(account, version, MoneyDeposited(amount=amount)))
    history.append(envelope(account, version + 1, MoneyWithdrawn(amount=7)))
    history.append(envelope(account, version + 2, AccountFrozen()))
    return history


def transfer_history() -> list[EventEnvelope]:
    transfer, source, target = uuid4(), uuid4(), uuid4()
    requested = TransferRequested(from_account_id=source, to_account_id=target, amount=5)
    return [
        envelope(transfer, 1, requested, aggregate_type=TRANSFER),
        envelope(transfer, 2, TransferCompleted(), aggregate_type=TRANSFER),
    ]


def interleaved(*streams: Sequence[EventEnvelope]) -> list[EventEnvelope]:
    """The streams' events mixed as a partition delivers them, each stream in order."""
    mixed: list[EventEnvelope] = []
    for index in range(max(len(stream) for stream in streams)):
        mixed.extend(stream[index] for stream in streams if index < len(stream))
    return mixed


def statuses(outcomes: Sequence[Outcome]) -> list[str]:
    named = []
    for outcome in outcomes:
        match outcome:
            case Rejected(reason=reason):
                named.append(f"parked: {reason.split(':')[0]}")
            case Projected(applied=applied, duplicates=duplicates):
                named.append("applied" if applied else "duplicate" if duplicates else "none")
    return named


async def test_a_batch_folds_each_documents_events_into_one_write_with_the_state_of_one_at_a_time(
    counted: Counted, services: Services
) -> None:
    first, second = account_history(deposits=6), account_history(deposits=3)
    transfer = transfer_history()
    batch = interleaved(first, second, transfer)
    catalog = ledger_catalog(counted.database)
    await catalog.ensure_current_indexes()
    counted.writes.clear()

    outcomes = await projector_over(catalog).project_batch(batch)

    assert statuses(outcomes) == ["applied"] * len(batch)
    # Both accounts are new: each collection gets one insert of their folded documents.
    assert counted.read_model_writes() == {
        "accounts": 1,
        "owner_accounts": 1,
        "transactions": 1,
        "transaction_heads": 1,
        "transfers": 1,
    }
    assert (
        differences(
            await snapshot(counted.database), await reference_snapshot(services.mongo_url, batch)
        )
        == []
    )

    # Later events of known documents: one guarded update per collection.
    later = [
        envelope(first[0].aggregate_id, first[-1].version + 1, MoneyDeposited(amount=3)),
        envelope(second[0].aggregate_id, second[-1].version + 1, MoneyDeposited(amount=4)),
        envelope(first[0].aggregate_id, first[-1].version + 2, MoneyDeposited(amount=5)),
    ]
    counted.writes.clear()

    assert statuses(await projector_over(catalog).project_batch(later)) == ["applied"] * 3
    assert counted.read_model_writes() == {
        "accounts": 1,
        "owner_accounts": 1,
        "transactions": 1,
        "transaction_heads": 1,
        "transfers": 0,
    }
    assert (
        differences(
            await snapshot(counted.database),
            await reference_snapshot(services.mongo_url, [*batch, *later]),
        )
        == []
    )
    # One checkpoint per read model and batch, at the batch's highest position.
    checkpoints = await MongoCheckpoints(counted.database[CHECKPOINTS_COLLECTION]).all()
    assert checkpoints["accounts"] == max(event.position for event in later)


async def test_redelivering_a_whole_batch_changes_nothing(
    counted: Counted, services: Services
) -> None:
    batch = interleaved(account_history(deposits=4), account_history(deposits=2))
    catalog = ledger_catalog(counted.database)
    projector = projector_over(catalog)
    await projector.project_batch(batch)
    before = await snapshot(counted.database)
    counted.writes.clear()

    outcomes = await projector.project_batch(batch)

    assert statuses(outcomes) == ["duplicate"] * len(batch)
    assert sum(counted.read_model_writes().values()) == 0
    assert differences(await snapshot(counted.database), before) == []


class Failing:
    """A projection of one aggregate with a bug that shows on one of its events only."""

    name = "failing"

    def __init__(self, event: EventEnvelope) -> None:
        self.event_id = event.event_id
        self.aggregate_id = event.aggregate_id

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_id == self.aggregate_id

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        if envelope.event_id == self.event_id:
            raise RuntimeError("bug")
        return ApplyResult.applied(envelope.version - 1)


class WithFailing:
    """The catalog's targets, plus a projection that fails on one event."""

    def __init__(self, catalog: ReadModelCatalog, failing: Failing) -> None:
        self._catalog = catalog
        self._failing = failing

    async def targets(self, envelope: EventEnvelope) -> Targets:
        return (await self.targets_of([envelope]))[0]

    async def targets_of(self, envelopes: Sequence[EventEnvelope]) -> list[Targets]:
        found = await self._catalog.targets_of(envelopes)
        return [Targets(live=[*t.live, self._failing], shadows=t.shadows) for t in found]


async def test_each_event_of_a_batch_gets_its_own_outcome(
    counted: Counted, services: Services
) -> None:
    catalog = ledger_catalog(counted.database)
    known, gapped, other = uuid4(), uuid4(), uuid4()
    earlier = [*opened_account(known, deposit=10), *opened_account(gapped, deposit=10)]
    await projector_over(catalog).project_batch(earlier)
    # `gapped` is at version 2: its version 4 comes without 3, and its version 5 after that.
    duplicate = earlier[1]
    gap = envelope(gapped, 4, MoneyDeposited(amount=1))
    after_gap = envelope(gapped, 5, MoneyDeposited(amount=1))
    invalid = envelope(known, 3, MoneyDeposited(amount=0))  # amounts are positive
    fine = envelope(known, 4, MoneyDeposited(amount=2))  # after the invalid one: a gap too
    opened = opened_account(other, deposit=30)
    failing = envelope(other, 3, MoneyDeposited(amount=4))
    last = envelope(other, 4, MoneyDeposited(amount=8))
    batch = [duplicate, gap, invalid, *opened, after_gap, fine, failing, last]
    projector = Projector(
        WithFailing(catalog, Failing(failing)),
        checkpoints=MongoCheckpoints(counted.database[CHECKPOINTS_COLLECTION]),
        gap_policy=NO_WAIT,
    )

    outcomes = await projector.project_batch(batch)

    assert statuses(outcomes) == [
        "duplicate",
        "parked: version gap in projection accounts",
        "parked: invalid event for projection accounts",
        "applied",
        "applied",
        "parked: version gap in projection accounts",
        "parked: version gap in projection accounts",
        "parked: projection failed",
        "applied",
    ]
    failed = outcomes[batch.index(failing)]
    assert isinstance(failed, Rejected)
    assert failed.reason == "projection failed: RuntimeError: bug"
    # The others are in: the read models hold what the events they took make.
    accounts = {
        doc["_id"]: (doc["version"], doc["balance"])
        async for doc in counted.database["accounts_v1"].find({})
    }
    assert accounts == {str(known): (2, 10), str(gapped): (2, 10), str(other): (4, 42)}


async def test_a_lone_event_is_projected_without_waiting_for_more(
    broker: str, services: Services, mongo_db: str
) -> None:
    settings = QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=2,
        projector_batch_size=64,
    )
    async with scratch_database(services.mongo_url) as database:
        runtime: ProjectorRuntime = await start_projector(settings, database)
        connection: AbstractRobustConnection = await aio_pika.connect_robust(broker)
        try:
            channel: AbstractChannel = await connection.channel()
            exchange = await channel.get_exchange(EVENTS_EXCHANGE)
            account = uuid4()
            opening = opened_account(account)
            for event in opening:
                await publish(exchange, event)
            # Nothing else comes: the lone event is not held back for a batch to fill up.
            await eventually(
                lambda: _version_of(database, str(account)), lambda v: v == len(opening)
            )
            lone = envelope(account, len(opening) + 1, MoneyDeposited(amount=9))
            await publish(exchange, lone)
            await eventually(
                lambda: _version_of(database, str(account)), lambda v: v == lone.version
            )
        finally:
            await connection.close()
            await runtime.stop(grace_seconds=5)


async def test_a_backlog_is_drained_in_batches_to_the_state_of_one_at_a_time(
    broker: str, services: Services, counted: Counted, mongo_db: str
) -> None:
    settings = QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=2,
        prefetch=32,
        projector_batch_size=32,
    )
    streams = [account_history(deposits=20) for _ in range(6)]
    everything = interleaved(*streams)
    catalog = ledger_catalog(counted.database)
    connection: AbstractRobustConnection = await aio_pika.connect_robust(broker)
    runtime = await start_projector(settings, counted.database, catalog=catalog)
    sizes: list[int] = []
    batch_handler = runtime.consumer._batch_handler
    assert batch_handler is not None

    async def spy(envelopes: Sequence[EventEnvelope]) -> Sequence[Outcome]:
        sizes.append(len(envelopes))
        return await batch_handler(envelopes)

    runtime.consumer._batch_handler = spy
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        for event in everything:
            await publish(exchange, event)
        for stream in streams:
            await _reaches(counted.database, stream[-1])
    finally:
        await runtime.stop(grace_seconds=5)
        await connection.close()

    assert sum(sizes) == len(everything)  # every event once: all acked, none redelivered
    assert max(sizes) > 1
    assert (
        differences(
            await snapshot(counted.database),
            await reference_snapshot(services.mongo_url, everything),
        )
        == []
    )
    writes = sum(counted.writes[name] for name in READ_MODEL_COLLECTIONS)
    assert writes < 4 * len(everything)  # one at a time: 5 per account event


async def _reaches(database: AsyncDatabase[Document], event: EventEnvelope) -> None:
    account = str(event.aggregate_id)
    await eventually(lambda: _version_of(database, account), lambda v: v == event.version)


async def _version_of(database: AsyncDatabase[Document], account: str) -> int | None:
    found = await database["accounts_v1"].find_one({"_id": account})
    return None if found is None else int(found["version"])


class ListReplay:
    """A replay source over a list, in batches as small as the broker's may come."""

    def __init__(self, events: Sequence[EventEnvelope], batch: int) -> None:
        self.events = list(events)
        self.batch = batch

    async def replay(
        self, *, after_position: int, aggregate_types: Sequence[str]
    ) -> AsyncIterator[ReplayItem]:
        selected = [e for e in self.events if e.position > after_position]
        up_to = max((e.position for e in self.events), default=0)
        progress = ReplayProgress(
            request_id=uuid4(),
            total=len(selected),
            after_position=after_position,
            up_to_position=up_to,
        )
        yield ReplayStarted(progress)
        for start in range(0, len(selected), self.batch):
            yield ReplayEvents(selected[start : start + self.batch])
        yield ReplayFinished(progress)


async def test_a_rebuild_writes_each_document_once_per_write_window(
    counted: Counted, services: Services
) -> None:
    streams = [account_history(deposits=8) for _ in range(20)]
    everything = sorted(interleaved(*streams), key=lambda event: event.position)
    catalog = ledger_catalog(counted.database)
    await projector_over(catalog).project_batch(everything[:3])  # the current generation
    counted.writes.clear()
    rebuild = Rebuild(
        catalog,
        ListReplay(everything, batch=7),
        ["accounts", "owner_summaries"],
        policy=RebuildPolicy(retire_seconds=0, progress_seconds=60, write_events=1_000),
    )

    progress = await rebuild.run()

    assert progress.state == "done"
    # One window: each account's document is inserted once, all its events folded into it.
    assert counted.writes["accounts"] == 1
    assert counted.writes["owner_accounts"] == 1
