"""MongoDB: the client and the projections' checkpoints.

The versioned-document store the projections write into is theirs (`projections.store`); the
generations of read models are the service layer's (`service_layer.catalog`).
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Sequence

import structlog
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from cqrs_runtime.supervision import Supervisor, mark_healthy
from query_service.projections.store import TRANSIENT_ERRORS, Document

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

CHECKPOINTS_COLLECTION = "checkpoints"


def create_client(
    mongo_url: str,
    *,
    timeout_ms: int = 5_000,
    listeners: Sequence[monitoring.CommandListener] = (),
) -> AsyncMongoClient[Document]:
    """A client that returns timezone-aware datetimes; call inside the running loop."""
    return AsyncMongoClient(
        mongo_url,
        tz_aware=True,
        appname="cqrs-query-service",
        serverSelectionTimeoutMS=timeout_ms,
        event_listeners=list(listeners),
    )


_GENERATION = re.compile(r"_v\d+$")


class WriteCounter(monitoring.CommandListener):
    """Counts the write commands the client sends (each a round trip), per collection, its
    generation suffix left out (`accounts_v3` counts as `accounts`)."""

    WRITES = frozenset({"insert", "update", "delete", "findAndModify"})

    def __init__(self, counts: collections.Counter[str]) -> None:
        self.counts = counts

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in self.WRITES:
            collection = str(event.command.get(event.command_name, ""))
            self.counts[_GENERATION.sub("", collection)] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


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
