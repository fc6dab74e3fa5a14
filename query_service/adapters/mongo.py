"""MongoDB: the client, the version guard every per-aggregate read model uses, and checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    ServerSelectionTimeoutError,
)

from query_service.projections.base import ApplyResult, InvalidEvent

Document = dict[str, Any]

# Errors worth retrying: the server is unreachable or stepping down, not the write being wrong.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    AutoReconnect,
    ConnectionFailure,
    ServerSelectionTimeoutError,
)

ACCOUNTS_COLLECTION = "accounts"
CHECKPOINTS_COLLECTION = "checkpoints"

VERSION_FIELD = "version"
POSITION_FIELD = "last_position"


def create_client(mongo_url: str, *, timeout_ms: int = 5_000) -> AsyncMongoClient[Document]:
    """A client that returns timezone-aware datetimes; call inside the running loop."""
    return AsyncMongoClient(
        mongo_url,
        tz_aware=True,
        appname="cqrs-query-service",
        serverSelectionTimeoutMS=timeout_ms,
    )


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
        if version != 1:
            raise InvalidEvent(f"a creating event must have version 1, not {version}")
        document: Document = {
            **fields,
            "_id": aggregate_id,
            VERSION_FIELD: version,
            POSITION_FIELD: position,
        }
        try:
            await self._collection.insert_one(document)
        except DuplicateKeyError:
            return ApplyResult.duplicate(await self.version_of(aggregate_id))
        return ApplyResult.applied(None)

    async def advance(
        self, aggregate_id: str, *, version: int, position: int, update: Mapping[str, Any]
    ) -> ApplyResult:
        """Apply `update` only when the stored version is `version - 1`."""
        guarded = dict(update)
        guarded["$set"] = {
            **dict(update.get("$set", {})),
            VERSION_FIELD: version,
            POSITION_FIELD: position,
        }
        result = await self._collection.update_one(
            {"_id": aggregate_id, VERSION_FIELD: version - 1}, guarded
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
