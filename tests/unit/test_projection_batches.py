"""A batch of events through the projector, on the in-memory store: the state and the outcomes
of projecting them one at a time."""

from __future__ import annotations

import random
from uuid import uuid4

from query_service.adapters.mongo import CHECKPOINTS_COLLECTION, MongoCheckpoints
from query_service.domains import ledger
from query_service.projections.store import Document
from query_service.service_layer.catalog import ReadModelCatalog, build_catalog
from query_service.service_layer.projector import GapPolicy, Outcome, Projected, Projector
from query_service.testing import memory_database
from shared.ledger import AccountFrozen, MoneyDeposited, MoneyWithdrawn
from shared.messages import EventEnvelope
from tests.query_support import envelope, opened_account

NO_WAIT = GapPolicy(attempts=1, delay_seconds=0)


def projector(catalog: ReadModelCatalog) -> Projector:
    checkpoints = MongoCheckpoints(catalog.database[CHECKPOINTS_COLLECTION])
    return Projector(catalog, checkpoints=checkpoints, gap_policy=NO_WAIT)


def histories(count: int, rng: random.Random) -> list[list[EventEnvelope]]:
    streams = []
    for _ in range(count):
        account = uuid4()
        stream = opened_account(account, deposit=50)
        for _ in range(rng.randint(0, 8)):
            event = rng.choice([MoneyDeposited(amount=3), MoneyWithdrawn(amount=1)])
            stream.append(envelope(account, len(stream) + 1, event))
        if rng.random() < 0.3:
            stream.append(envelope(account, len(stream) + 1, AccountFrozen()))
        streams.append(stream)
    return streams


async def documents(catalog: ReadModelCatalog) -> dict[str, list[Document]]:
    found = {}
    for name in catalog.models:
        for logical, collection in catalog.collections(name, 1).items():
            found[logical] = await collection.find({}).sort("_id", 1).to_list()
    return found


def summary(outcome: Outcome) -> str:
    if isinstance(outcome, Projected):
        return "applied" if outcome.applied else "duplicate" if outcome.duplicates else "none"
    return f"parked: {outcome.reason}"


async def test_batches_with_repeats_and_gaps_end_as_one_at_a_time() -> None:
    rng = random.Random(7)
    streams = histories(12, rng)
    delivered: list[EventEnvelope] = []
    for index in range(max(len(stream) for stream in streams)):
        delivered.extend(stream[index] for stream in streams if index < len(stream))
    # Redeliveries, and a few events whose predecessor never comes.
    delivered += rng.sample(delivered, 10)
    delivered += [
        envelope(stream[0].aggregate_id, 40, MoneyDeposited(amount=1)) for stream in streams[:3]
    ]
    batched = build_catalog(memory_database(), ledger.domain.read_models)
    single = build_catalog(memory_database(), ledger.domain.read_models)

    outcomes: list[Outcome] = []
    for start in range(0, len(delivered), 17):
        outcomes += await projector(batched).project_batch(delivered[start : start + 17])
    one_by_one = [await projector(single)(event) for event in delivered]

    assert [summary(o) for o in outcomes] == [summary(o) for o in one_by_one]
    assert await documents(batched) == await documents(single)
