"""The versioned-document store the projections write into, and how generations are named.

A read model keeps one document per aggregate (`_id` = aggregate id) that only ever accepts the
aggregate's next version (`VersionedCollection`); the projection framework and the domains'
read models are written against it. A read model lives in generations of its collections:
generation n of `accounts` is `accounts_vn`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
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

VERSION_FIELD = "version"
POSITION_FIELD = "last_position"

_GENERATION_SUFFIX = re.compile(r"_v(\d+)$")


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
