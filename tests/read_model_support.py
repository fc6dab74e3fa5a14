"""Helpers for tests of the read models: snapshots of the current generations, reference replays."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import create_client
from query_service.domains import ledger
from query_service.projections.store import Document
from query_service.service_layer.catalog import FIRST_GENERATION, ReadModelCatalog, build_catalog
from shared.messages import EventEnvelope

Snapshot = dict[str, list[Document]]


def ledger_catalog(database: AsyncDatabase[Document]) -> ReadModelCatalog:
    """The ledger's read models over `database`."""
    return build_catalog(database, ledger.domain.read_models)


async def snapshot(database: AsyncDatabase[Document]) -> Snapshot:
    """Every document of every read model's current generation, by logical collection name."""
    catalog = ledger_catalog(database)
    states = await catalog.registry.states()
    found: Snapshot = {}
    for name in catalog.models:
        generation = states[name].current if name in states else FIRST_GENERATION
        for logical, collection in catalog.collections(name, generation).items():
            found[logical] = await collection.find({}).sort("_id", 1).to_list()
    return found


async def generation_snapshot(
    database: AsyncDatabase[Document], name: str, generation: int
) -> Snapshot:
    catalog = ledger_catalog(database)
    return {
        logical: await collection.find({}).sort("_id", 1).to_list()
        for logical, collection in catalog.collections(name, generation).items()
    }


async def replay_one_by_one(
    database: AsyncDatabase[Document], events: Iterable[EventEnvelope]
) -> None:
    """Apply `events` in order, one at a time, to the first generation of every read model."""
    catalog = ledger_catalog(database)
    projections = [catalog.projection(name, FIRST_GENERATION) for name in catalog.models]
    for event in events:
        for projection in projections:
            if projection.handles(event):
                await projection.apply(event)


@asynccontextmanager
async def scratch_database(mongo_url: str) -> AsyncIterator[AsyncDatabase[Document]]:
    """A fresh database, dropped on exit."""
    client = create_client(mongo_url)
    name = f"cqrs_scratch_{uuid.uuid4().hex[:12]}"
    try:
        yield client[name]
    finally:
        await client.drop_database(name)
        await client.close()


async def reference_snapshot(mongo_url: str, events: Iterable[EventEnvelope]) -> Snapshot:
    """The read models a sequential replay of `events` into an empty database produces."""
    async with scratch_database(mongo_url) as database:
        await replay_one_by_one(database, events)
        return await snapshot(database)


def differences(actual: Snapshot, expected: Snapshot, *, limit: int = 5) -> list[str]:
    """Readable differences between two snapshots (empty when equal)."""
    problems: list[str] = []
    for collection in sorted(set(actual) | set(expected)):
        mine = {doc["_id"]: doc for doc in actual.get(collection, [])}
        theirs = {doc["_id"]: doc for doc in expected.get(collection, [])}
        for key in sorted(set(mine) | set(theirs), key=str):
            if mine.get(key) != theirs.get(key):
                problems.append(f"{collection}[{key}]: {mine.get(key)!r} != {theirs.get(key)!r}")
                if len(problems) >= limit:
                    return problems
    return problems


def counts(found: Snapshot) -> dict[str, int]:
    return {name: len(documents) for name, documents in found.items()}


def strip(documents: list[Document], *fields: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in doc.items() if k not in fields} for doc in documents]
