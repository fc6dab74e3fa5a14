"""Blue-green rebuilds on the real RabbitMQ and MongoDB, with replays answered from a list.

The live projector keeps projecting and the API keeps answering while a new generation is
filled from the replay; after the switch the read models equal a sequential replay of every
event, the API never went back in time, and the old generation is gone.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID, uuid4

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import create_client
from query_service.adapters.replay_source import (
    AmqpReplaySource,
    ReplayTimeoutError,
    ReplayUnavailableError,
)
from query_service.bootstrap import ProjectorRuntime, start_projector
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.service_layer.catalog import ModelState, RebuildConflictError
from query_service.service_layer.rebuild import Rebuild, RebuildPolicy, RebuildProgress
from query_service.settings import QueryServiceSettings
from shared.ledger import (
    TRANSFER,
    AccountFrozen,
    AccountUnfrozen,
    MoneyCreditedFromTransfer,
    MoneyDebitedForTransfer,
    MoneyDeposited,
    MoneyWithdrawn,
    TransferCompleted,
    TransferDebitSettled,
    TransferRequested,
)
from shared.messages import Event, EventEnvelope
from shared.topology import (
    EVENTS_EXCHANGE,
    PROJECTOR_PARKED_QUEUE,
    REPLAY_EXCHANGE,
    REPLAY_REQUESTS_QUEUE,
)
from tests.conftest import Services
from tests.query_support import envelope, eventually, opened_account, publish
from tests.read_model_support import differences, ledger_catalog, reference_snapshot, snapshot
from tests.replay_support import FakeReplayServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ALL = ["accounts", "transactions", "owner_summaries", "transfers"]
FAST = RebuildPolicy(retire_seconds=0.2, progress_seconds=0.2)


@pytest.fixture
def settings(broker: str, services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=3,
        prefetch=32,
        rebuild_batch_size=100,
        rebuild_retire_seconds=0.2,
        rebuild_start_timeout_seconds=10,
    )


@pytest.fixture
async def database(settings: QueryServiceSettings) -> AsyncIterator[AsyncDatabase[Document]]:
    client = create_client(settings.mongo_url)
    yield client[settings.mongo_db]
    await client.close()


@pytest.fixture
async def projector(
    settings: QueryServiceSettings, database: AsyncDatabase[Document]
) -> AsyncIterator[ProjectorRuntime]:
    runtime = await start_projector(settings, database)
    yield runtime
    await runtime.stop(grace_seconds=5)


@pytest.fixture
async def connection(broker: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(broker)
    yield connection
    await connection.close()


@pytest.fixture
async def events(
    projector: ProjectorRuntime, connection: AbstractRobustConnection
) -> AbstractExchange:
    channel = await connection.channel()
    return await channel.get_exchange(EVENTS_EXCHANGE)


class Ledger:
    """Generates a plausible event history and publishes it as the relay would."""

    def __init__(self, exchange: AbstractExchange, seed: int = 1) -> None:
        self.exchange = exchange
        self.published: list[EventEnvelope] = []
        self.accounts: list[UUID] = []
        self.versions: dict[UUID, int] = {}
        self.rng = random.Random(seed)

    async def emit(self, aggregate: UUID, event: Event, aggregate_type: str = "account") -> None:
        self.versions[aggregate] = self.versions.get(aggregate, 0) + 1
        recorded = envelope(
            aggregate, self.versions[aggregate], event, aggregate_type=aggregate_type
        )
        self.published.append(recorded)  # "committed" before it is published
        await publish(self.exchange, recorded)

    async def open_accounts(self, count: int) -> None:
        for index in range(count):
            account = uuid4()
            self.accounts.append(account)
            for event in opened_account(account, owner_id=f"owner{index % 4}", deposit=1_000):
                self.versions[account] = event.version
                self.published.append(event)
                await publish(self.exchange, event)

    async def activity(self, steps: int, pause: float = 0.0) -> None:
        for _ in range(steps):
            account = self.rng.choice(self.accounts)
            match self.rng.randrange(4):
                case 0:
                    await self.emit(account, MoneyDeposited(amount=self.rng.randint(1, 99)))
                case 1:
                    await self.emit(account, MoneyWithdrawn(amount=self.rng.randint(1, 9)))
                case 2:
                    transfer = uuid4()
                    sink = self.rng.choice([a for a in self.accounts if a != account])
                    request = TransferRequested(
                        from_account_id=account, to_account_id=sink, amount=3
                    )
                    await self.emit(transfer, request, TRANSFER)
                    await self.emit(
                        account,
                        MoneyDebitedForTransfer(
                            transfer_id=transfer, amount=3, currency="EUR", to_account_id=sink
                        ),
                    )
                    await self.emit(
                        sink,
                        MoneyCreditedFromTransfer(
                            transfer_id=transfer, amount=3, from_account_id=account
                        ),
                    )
                    await self.emit(account, TransferDebitSettled(transfer_id=transfer))
                    await self.emit(transfer, TransferCompleted(), TRANSFER)
                case _:
                    await self.emit(account, AccountFrozen())
                    await self.emit(account, AccountUnfrozen())
            if pause:
                await asyncio.sleep(pause)


async def projected(database: AsyncDatabase[Document], ledger: Ledger) -> None:
    """Wait until the live read models hold every published event (their heads match)."""

    async def versions() -> dict[str, int]:
        catalog = ledger_catalog(database)
        accounts = await catalog.collection("accounts")
        heads = await catalog.collection("transactions", "transaction_heads")
        found = {doc["_id"]: doc["version"] async for doc in accounts.find({}, {"version": 1})}
        found |= {"h" + doc["_id"]: doc["version"] async for doc in heads.find({}, {"version": 1})}
        return found

    wanted = {str(a): v for a, v in ledger.versions.items() if a in ledger.accounts}
    wanted |= {"h" + key: value for key, value in wanted.items()}
    await eventually(versions, lambda found: all(found.get(k) == v for k, v in wanted.items()))


async def parked_count(connection: AbstractRobustConnection) -> int:
    channel = await connection.channel()
    queue = await channel.declare_queue(PROJECTOR_PARKED_QUEUE, passive=True)
    await channel.close()
    return int(queue.declaration_result.message_count or 0)


async def test_rebuilds_every_read_model_while_events_and_queries_keep_flowing(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    events: AbstractExchange,
    connection: AbstractRobustConnection,
) -> None:
    ledger = Ledger(events)
    await ledger.open_accounts(24)
    await ledger.activity(60)
    await projected(database, ledger)
    catalog = ledger_catalog(database)
    seen: list[RebuildProgress] = []

    app = create_app(settings, database=database)
    transport = httpx.ASGITransport(app=app)
    watched = ledger.accounts[:4]
    reads: list[tuple[str, int, int]] = []  # (account, status, version)
    stop_reading = asyncio.Event()

    async def read_all_the_time(api: httpx.AsyncClient) -> None:
        while not stop_reading.is_set():
            for account in watched:
                response = await api.get(f"/accounts/{account}")
                reads.append(
                    (str(account), response.status_code, response.json().get("version", 0))
                )
            await asyncio.sleep(0.01)

    async with (
        FakeReplayServer(settings.amqp_url, ledger.published, pause=0.002) as server,
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as api,
    ):
        reader = asyncio.create_task(read_all_the_time(api))
        traffic = asyncio.create_task(ledger.activity(60, pause=0.01))
        rebuild = Rebuild(
            catalog,
            AmqpReplaySource(connection, batch_size=100),
            ALL,
            policy=FAST,
            on_progress=lambda progress: seen.append(
                RebuildProgress(**{**progress.__dict__, "switched": list(progress.switched)})
            ),
        )
        result = await rebuild.run()
        await traffic
        await ledger.activity(10)  # after the switch too
        await projected(database, ledger)
        stop_reading.set()
        await reader

    assert result.state == "done" and sorted(result.switched) == sorted(ALL)
    assert server.requests[0].after_position == 0
    assert server.requests[0].aggregate_types == ["account", "transfer"]
    states = await catalog.registry.states()
    assert {name: state.current for name, state in states.items()} == dict.fromkeys(ALL, 2)
    assert all(state.target is None for state in states.values())
    names = set(await database.list_collection_names())
    assert "accounts_v2" in names and "accounts_v1" not in names
    assert not {"transactions_v1", "owner_summaries_v1", "transfers_v1"} & names

    expected = await reference_snapshot(settings.mongo_url, ledger.published)
    assert differences(await snapshot(database), expected) == []
    assert await parked_count(connection) == 0

    # Progress was shown: events done of a known total, at a measured rate.
    replaying = [p for p in seen if p.state == "replaying" and p.total]
    assert replaying and replaying[-1].done == replaying[-1].total
    assert any(p.rate > 0 for p in replaying)
    # Queries never stopped and never went back in time across the switch.
    assert {status for _, status, _ in reads} == {200}
    for account in watched:
        versions = [version for key, _, version in reads if key == str(account)]
        assert versions == sorted(versions)


async def test_a_replay_started_over_by_the_command_side_changes_nothing(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    events: AbstractExchange,
    connection: AbstractRobustConnection,
) -> None:
    ledger = Ledger(events, seed=2)
    await ledger.open_accounts(8)
    await ledger.activity(30)
    await projected(database, ledger)
    before = await snapshot(database)

    async with FakeReplayServer(settings.amqp_url, ledger.published, restart_after=25):
        result = await Rebuild(
            ledger_catalog(database),
            AmqpReplaySource(connection, batch_size=10),
            ["accounts", "transactions"],
            policy=FAST,
        ).run()

    assert result.switched == ["accounts", "transactions"]
    assert differences(await snapshot(database), before) == []


async def test_a_rebuild_without_an_answer_fails_and_leaves_the_live_model_alone(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    events: AbstractExchange,
    connection: AbstractRobustConnection,
) -> None:
    ledger = Ledger(events, seed=3)
    await ledger.open_accounts(3)
    await projected(database, ledger)
    catalog = ledger_catalog(database)

    def rebuild() -> Rebuild:
        source = AmqpReplaySource(connection, start_timeout=0.5)
        return Rebuild(catalog, source, ["accounts"], policy=FAST)

    # No command service has declared the request queue: the request cannot be routed.
    with pytest.raises(ReplayUnavailableError):
        await rebuild().run()
    # A request queue nobody consumes: the replay never starts.
    channel = await connection.channel()
    requests = await channel.declare_exchange(
        REPLAY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(REPLAY_REQUESTS_QUEUE, durable=True)
    await queue.bind(requests, routing_key=REPLAY_REQUESTS_QUEUE)
    with pytest.raises(ReplayTimeoutError):
        await rebuild().run()
    await queue.purge()

    state = await catalog.registry.state("accounts")
    assert (state.current, state.target) == (1, None)
    document = await catalog.registry.document("accounts")
    assert document is not None and document["rebuild"]["state"] == "failed"
    assert "accounts_v2" not in await database.list_collection_names()
    await ledger.activity(5)
    await projected(database, ledger)  # the live projector went on


async def test_a_second_rebuild_of_the_same_model_is_refused_while_one_runs(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    events: AbstractExchange,
    connection: AbstractRobustConnection,
) -> None:
    ledger = Ledger(events, seed=4)
    await ledger.open_accounts(3)
    await projected(database, ledger)
    catalog = ledger_catalog(database)
    first = Rebuild(catalog, AmqpReplaySource(connection), ["transfers"], policy=FAST)
    await first.claim()

    with pytest.raises(RebuildConflictError):
        await Rebuild(catalog, AmqpReplaySource(connection), ["transfers"], policy=FAST).claim()

    app = create_app(settings, database=database)
    async with (
        FakeReplayServer(settings.amqp_url, ledger.published),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        refused = await api.post("/admin/rebuilds", json={"read_models": ["transfers"]})
        unknown = await api.post("/admin/rebuilds", json={"read_models": ["nonsense"]})
        await first.run()
        accepted = await api.post("/admin/rebuilds", json={"read_models": ["accounts"]})

        async def accounts_state() -> dict[str, object]:
            return dict((await api.get("/admin/read-models/accounts")).json())

        final = await eventually(
            accounts_state,
            lambda body: (body["rebuild"] or {}).get("state") == "done",  # type: ignore[attr-defined]
            timeout=30,
        )

    assert refused.status_code == 409
    assert unknown.status_code == 422
    assert accepted.status_code == 202
    assert final["current"] == 2
    assert final["rebuild"]["total"] == final["rebuild"]["done"]  # type: ignore[index]


async def test_events_after_the_final_check_reach_the_new_generation_through_the_live_projector(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    events: AbstractExchange,
    connection: AbstractRobustConnection,
) -> None:
    ledger = Ledger(events, seed=6)
    await ledger.open_accounts(6)
    await ledger.activity(20)
    await projected(database, ledger)

    class SwitchLate(Rebuild):
        """Lets live events land between the final check and the switch."""

        async def behind(self, name: str, state: ModelState) -> int:
            found = await super().behind(name, state)
            if not found:
                await ledger.activity(15)
                await projected(database, ledger)
            return found

    async with FakeReplayServer(settings.amqp_url, ledger.published):
        await SwitchLate(
            ledger_catalog(database), AmqpReplaySource(connection), ["accounts"], policy=FAST
        ).run()

    expected = await reference_snapshot(settings.mongo_url, ledger.published)
    assert differences(await snapshot(database), expected) == []


async def test_a_rebuild_replaces_owner_summaries_of_the_shape_before_the_upgrade(
    settings: QueryServiceSettings,
    database: AsyncDatabase[Document],
    events: AbstractExchange,
    connection: AbstractRobustConnection,
) -> None:
    # Three accounts projected by an older version: the other read models hold them as today,
    # the owner summary as one document per owner with an account -> owner collection.
    ledger = Ledger(events, seed=7)
    owner, old = "upgraded", [uuid4() for _ in range(3)]
    catalog = ledger_catalog(database)
    for index, account in enumerate(old):
        for event in opened_account(account, owner_id=owner, deposit=100 * (index + 1)):
            ledger.versions[account] = event.version
            ledger.published.append(event)
            for name in ("accounts", "transactions"):
                await catalog.projection(name, 1).apply(event)
    ledger.accounts += old
    await database["owner_summary_accounts_v1"].insert_many(
        [{"_id": str(account), "owner_id": owner, "currency": "EUR"} for account in old]
    )
    await database["owner_summaries_v1"].insert_one(
        {
            "_id": owner,
            "owner_id": owner,
            "accounts": {
                str(account): {
                    "currency": "EUR",
                    "balance": 100 * (index + 1),
                    "status": "open",
                    "version": 2,
                    "last_position": 0,
                    "opened_at": ledger.published[0].recorded_at,
                }
                for index, account in enumerate(old)
            },
            "totals": {"EUR": {"balance": 600, "accounts": 3}},
        }
    )

    # After the upgrade, before the rebuild: events of the old accounts are neither waited on
    # nor parked, and a new account is projected in the new shape.
    fresh = uuid4()
    await ledger.emit(old[0], MoneyDeposited(amount=5))
    await ledger.emit(old[1], MoneyWithdrawn(amount=7))
    # One aggregate's events are handled one after another, so once these are projected the
    # events before them were acknowledged or parked.
    await ledger.emit(old[0], AccountFrozen())
    await ledger.emit(old[1], AccountFrozen())
    for event in opened_account(fresh, owner_id=owner, deposit=40):
        ledger.versions[fresh] = event.version
        ledger.published.append(event)
        await publish(events, event)
    ledger.accounts.append(fresh)
    await projected(database, ledger)
    assert await parked_count(connection) == 0

    app = create_app(settings, database=database)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        before = (await api.get(f"/owners/{owner}/summary")).json()
        async with FakeReplayServer(settings.amqp_url, ledger.published):
            result = await Rebuild(
                catalog, AmqpReplaySource(connection), ["owner_summaries"], policy=FAST
            ).run()
        after = (await api.get(f"/owners/{owner}/summary")).json()

    # Until the rebuild, the summary knew only the account opened since the upgrade.
    assert [item["id"] for item in before["accounts"]] == [str(fresh)]
    assert result.switched == ["owner_summaries"]
    assert sorted(item["id"] for item in after["accounts"]) == sorted(map(str, [*old, fresh]))
    assert after["totals"] == [{"currency": "EUR", "balance": 100 + 5 + 200 - 7 + 300 + 40,
                                "accounts": 4}]  # fmt: skip
    names = set(await database.list_collection_names())
    assert "owner_accounts_v2" in names
    assert not {"owner_summaries_v1", "owner_summary_accounts_v1", "owner_accounts_v1"} & names
    expected = await reference_snapshot(settings.mongo_url, ledger.published)
    rebuilt = await snapshot(database)
    assert (
        differences(
            {"owner_accounts": rebuilt["owner_accounts"]},
            {"owner_accounts": expected["owner_accounts"]},
        )
        == []
    )
