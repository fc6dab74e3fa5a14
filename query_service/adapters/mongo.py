"""MongoDB: the client, generations of read-model collections, the version guard, checkpoints."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ServerSelectionTimeoutError,
)

from cqrs_runtime.supervision import Supervisor, mark_healthy
from query_service.projections.base import ApplyResult, InvalidEvent

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

Document = dict[str, Any]

# Errors worth retrying: the server is unreachable or stepping down, not the write being wrong.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    AutoReconnect,
    ConnectionFailure,
    ServerSelectionTimeoutError,
)

CHECKPOINTS_COLLECTION = "checkpoints"
# Which generation of each read model is current, and the rebuild in progress (see read_models).
READ_MODELS_COLLECTION = "read_models"

VERSION_FIELD = "version"
POSITION_FIELD = "last_position"

_GENERATION_SUFFIX = re.compile(r"_v(\d+)$")


def create_client(mongo_url: str, *, timeout_ms: int = 5_000) -> AsyncMongoClient[Document]:
    """A client that returns timezone-aware datetimes; call inside the running loop."""
    return AsyncMongoClient(
        mongo_url,
        tz_aware=True,
        appname="cqrs-query-service",
        serverSelectionTimeoutMS=timeout_ms,
    )


def generation_name(collection: str, generation: int) -> str:
    """The physical name of one generation of a read model's collection: `accounts_v2`."""
    return f"{collection}_v{generation}"


def generation_of(name: str, collection: str) -> int | None:
    """The generation a physical collection name belongs to, if it is one of `collection`'s."""
    match = _GENERATION_SUFFIX.search(name)
    if match is None or name[: match.start()] != collection:
        return None
    return int(match.group(1))


def generation_collections(
    database: AsyncDatabase[Document], collections: Sequence[str], generation: int
) -> dict[str, AsyncCollection[Document]]:
    """Logical name -> collection of one generation."""
    return {name: database[generation_name(name, generation)] for name in collections}


def is_duplicate_only(error: BulkWriteError) -> bool:
    """Whether every failure in a bulk write was a duplicate key (a concurrent insert won)."""
    write_errors = error.details.get("writeErrors", [])
    return bool(write_errors) and all(e.get("code") == 11000 for e in write_errors)


class VersionedCollection:
    """Per-aggregate documents (`_id` = aggregate id) that only ever accept the next version.

    This is the exactly-once guard: a write names the version it expects to find, so a redelivered
    event matches nothing (a duplicate) and an event after a gap matches nothing either (reported as
    a gap, never applied out of order). `version` and `last_position` are kept on every document.
    """

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self._collection = collection

    @property
    def collection(self) -> AsyncCollection[Document]:
        return self._collection

    async def create(
        self, aggregate_id: str, *, version: int, position: int, fields: Mapping[str, Any]
    ) -> ApplyResult:
        """Insert the document of an aggregate's first event; an existing one means a duplicate."""
        try:
            await self._collection.insert_one(
                self.new_document(aggregate_id, version=version, position=position, fields=fields)
            )
        except DuplicateKeyError:
            return ApplyResult.duplicate(await self.version_of(aggregate_id))
        return ApplyResult.applied(None)

    async def advance(
        self, aggregate_id: str, *, version: int, position: int, update: Mapping[str, Any]
    ) -> ApplyResult:
        """Apply `update` only when the stored version is `version - 1`."""
        result = await self._collection.update_one(
            *self.guarded(aggregate_id, version=version, position=position, update=update)
        )
        if result.matched_count == 1:
            return ApplyResult.applied(version - 1)
        stored = await self.version_of(aggregate_id)
        if stored is not None and stored >= version:
            return ApplyResult.duplicate(stored)
        # Unknown aggregate, an earlier version missing, or (rarely) the missing one landed just
        # now: all three are left to the caller's gap handling, which tries again.
        return ApplyResult.gap(stored)

    async def version_of(self, aggregate_id: str) -> int | None:
        found = await self._collection.find_one({"_id": aggregate_id}, {VERSION_FIELD: 1})
        if found is None:
            return None
        return int(found[VERSION_FIELD])

    # The same writes as operations for one ordered bulk write. Every operation carries its own
    # guard, so an ordered bulk has exactly the effect of applying the events one by one.

    @staticmethod
    def new_document(
        aggregate_id: str, *, version: int, position: int, fields: Mapping[str, Any]
    ) -> Document:
        if version != 1:
            raise InvalidEvent(f"a creating event must have version 1, not {version}")
        return {**fields, "_id": aggregate_id, VERSION_FIELD: version, POSITION_FIELD: position}

    @classmethod
    def create_op(
        cls, aggregate_id: str, *, version: int, position: int, fields: Mapping[str, Any]
    ) -> UpdateOne:
        document = cls.new_document(aggregate_id, version=version, position=position, fields=fields)
        del document["_id"]
        return UpdateOne({"_id": aggregate_id}, {"$setOnInsert": document}, upsert=True)

    @staticmethod
    def guarded(
        aggregate_id: str, *, version: int, position: int, update: Mapping[str, Any]
    ) -> tuple[Document, Document]:
        """The filter and update that apply `update` only at stored version `version - 1`."""
        guarded = dict(update)
        guarded["$set"] = {
            **dict(update.get("$set", {})),
            VERSION_FIELD: version,
            POSITION_FIELD: position,
        }
        return {"_id": aggregate_id, VERSION_FIELD: version - 1}, guarded

    @classmethod
    def advance_op(
        cls, aggregate_id: str, *, version: int, position: int, update: Mapping[str, Any]
    ) -> UpdateOne:
        query, guarded = cls.guarded(
            aggregate_id, version=version, position=position, update=update
        )
        return UpdateOne(query, guarded)


class MongoCheckpoints:
    """Checkpoints in one collection: `_id` = projection name, `position` only ever grows."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self._collection = collection

    async def advance(self, projection: str, position: int) -> None:
        try:
            await self._upsert_max(projection, position)
        except DuplicateKeyError:
            # Two concurrent upserts of a missing checkpoint: one inserted, so now it exists.
            await self._upsert_max(projection, position)

    async def _upsert_max(self, projection: str, position: int) -> None:
        await self._collection.update_one(
            {"_id": projection}, {"$max": {"position": position}}, upsert=True
        )

    async def position(self, projection: str) -> int | None:
        found = await self._collection.find_one({"_id": projection})
        if found is None:
            return None
        return int(found["position"])

    async def all(self) -> dict[str, int]:
        return {str(doc["_id"]): int(doc["position"]) async for doc in self._collection.find({})}


class BufferedCheckpoints:
    """Keeps the highest position per projection in memory and writes it every `interval`.

    A checkpoint records progress; correctness comes from the version guard, so losing the last
    fraction of a second of it in a crash costs nothing, while writing it per event would double
    the projector's writes. The writer runs under the supervisor: a write that fails for a
    reason other than an outage is logged, counted and tried again after a backoff (what was
    pending is kept).
    """

    TASK = "checkpoint-flusher"

    def __init__(
        self,
        store: MongoCheckpoints,
        *,
        interval: float = 0.25,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._store = store
        self._interval = interval
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._pending: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def advance(self, projection: str, position: int) -> None:
        if position > self._pending.get(projection, 0):
            self._pending[projection] = position
        if self._task is None:
            self._task = self._supervisor.spawn(self.TASK, self._run, restart_on_return=True).task

    async def position(self, projection: str) -> int | None:
        stored = await self._store.position(projection)
        pending = self._pending.get(projection)
        if stored is None or pending is None:
            return stored if pending is None else pending
        return max(stored, pending)

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        try:
            for projection, position in pending.items():
                await self._store.advance(projection, position)
        except BaseException:
            for projection, position in pending.items():
                self._pending[projection] = max(position, self._pending.get(projection, 0))
            raise

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except TRANSIENT_ERRORS as e:
                log.warning("checkpoint_flush_failed", error=repr(e))
                continue
            mark_healthy()

    async def close(self) -> None:
        """Stop the background writer and write what is pending."""
        if self._task is not None:
            await self._supervisor.stop(self.TASK)
            self._task = None
        try:
            await self.flush()
        except TRANSIENT_ERRORS as e:
            log.warning("checkpoint_flush_failed", error=repr(e))
