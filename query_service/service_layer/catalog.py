"""The read-model catalog: the read models, their generations, and where an event goes now.

Which generation of each read model is current is kept in the `read_models` collection, one
document per read model, `_id` = its name:

```
{current: 2, target: 3 | null, previous: 1 | null,
 rebuild: {id, owner, state, round, after_position, up_to_position, total, done, events,
           rate, eta_seconds, skipped_max_position, started_at, heartbeat, error, ...}}
```

No document means generation 1 is current and nothing is being rebuilt. `target` is set while a
rebuild fills that generation: the live projector then writes it too. Switching is one update of
`current`, which every API replica reads on every query.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from query_service.projections.base import BatchProjection, Projection
from query_service.projections.read_model import ReadModel
from query_service.projections.store import Document, generation_collections, generation_of
from query_service.service_layer.projector import Shadow, Targets
from shared.messages import EventEnvelope

T = TypeVar("T")

FIRST_GENERATION = 1
# The collection of the generation pointers (this module's docstring).
READ_MODELS_COLLECTION = "read_models"


@dataclass(frozen=True)
class ModelState:
    """Where one read model lives now."""

    name: str
    current: int = FIRST_GENERATION
    target: int | None = None
    rebuild_id: str | None = None

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> ModelState:
        rebuild = document.get("rebuild") or {}
        target = document.get("target")
        return cls(
            name=str(document["_id"]),
            current=int(document.get("current", FIRST_GENERATION)),
            target=None if target is None else int(target),
            rebuild_id=rebuild.get("id"),
        )


class RebuildConflictError(Exception):
    """Another rebuild of this read model is running (or took this one over)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class ReadModelRegistry:
    """Reads and moves the generation pointers; every change is one conditional update."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self._collection = collection

    async def states(self) -> dict[str, ModelState]:
        return {
            str(doc["_id"]): ModelState.from_document(doc)
            async for doc in self._collection.find({}, {"current": 1, "target": 1, "rebuild.id": 1})
        }

    async def state(self, name: str) -> ModelState:
        found = await self._collection.find_one({"_id": name})
        return ModelState(name) if found is None else ModelState.from_document(found)

    async def document(self, name: str) -> Document | None:
        return await self._collection.find_one({"_id": name})

    async def claim(
        self, name: str, *, rebuild_id: str, owner: str, stale_after: float
    ) -> ModelState:
        """Reserve the next generation of `name` for a rebuild; returns the new state.

        A rebuild whose heartbeat is older than `stale_after` seconds is taken over (its owner
        died); a live one raises `RebuildConflictError`.
        """
        now = utcnow()
        found = await self._collection.find_one({"_id": name})
        rebuild = {
            "id": rebuild_id,
            "owner": owner,
            "state": "starting",
            "round": 0,
            "skipped_max_position": 0,
            "started_at": now,
            "heartbeat": now,
        }
        if found is None:
            try:
                await self._collection.insert_one(
                    {
                        "_id": name,
                        "current": FIRST_GENERATION,
                        "target": FIRST_GENERATION + 1,
                        "previous": None,
                        "rebuild": rebuild,
                    }
                )
            except DuplicateKeyError as e:
                raise RebuildConflictError(f"{name}: another rebuild started just now") from e
            return ModelState(name, FIRST_GENERATION, FIRST_GENERATION + 1, rebuild_id)
        state = ModelState.from_document(found)
        if state.target is not None:
            heartbeat = (found.get("rebuild") or {}).get("heartbeat")
            if heartbeat is not None and now - heartbeat < timedelta(seconds=stale_after):
                raise RebuildConflictError(
                    f"{name}: rebuild {state.rebuild_id} into generation {state.target} is running"
                )
        target = state.current + 1
        result = await self._collection.update_one(
            {"_id": name, "current": state.current, "rebuild.id": state.rebuild_id},
            {"$set": {"target": target, "rebuild": rebuild}},
        )
        if result.matched_count != 1:
            raise RebuildConflictError(f"{name}: changed while claiming; try again")
        return ModelState(name, state.current, target, rebuild_id)

    async def record_skip(self, name: str, target: int, position: int) -> None:
        """The live projector could not write an event into `target` (it is behind there)."""
        await self._collection.update_one(
            {"_id": name, "target": target},
            {"$max": {"rebuild.skipped_max_position": position}},
        )

    async def save_progress(self, name: str, rebuild_id: str, fields: Mapping[str, Any]) -> None:
        """Record progress and the heartbeat; raises if the rebuild is no longer ours."""
        update = {f"rebuild.{key}": value for key, value in fields.items()}
        update["rebuild.heartbeat"] = utcnow()
        result = await self._collection.update_one(
            {"_id": name, "rebuild.id": rebuild_id}, {"$set": update}
        )
        if result.matched_count != 1:
            raise RebuildConflictError(f"{name}: rebuild {rebuild_id} was taken over")

    async def skipped_max_position(self, name: str, rebuild_id: str) -> int:
        found = await self._collection.find_one(
            {"_id": name, "rebuild.id": rebuild_id}, {"rebuild.skipped_max_position": 1}
        )
        if found is None:
            raise RebuildConflictError(f"{name}: rebuild {rebuild_id} was taken over")
        return int(found["rebuild"].get("skipped_max_position", 0))

    async def switch(self, name: str, rebuild_id: str, *, current: int, target: int) -> None:
        """Make `target` current in one update; the API reads it on its next query."""
        now = utcnow()
        result = await self._collection.update_one(
            {"_id": name, "rebuild.id": rebuild_id, "current": current, "target": target},
            {
                "$set": {
                    "current": target,
                    "target": None,
                    "previous": current,
                    "rebuild.state": "switched",
                    "rebuild.switched_at": now,
                    "rebuild.heartbeat": now,
                }
            },
        )
        if result.matched_count != 1:
            raise RebuildConflictError(f"{name}: rebuild {rebuild_id} was taken over")

    async def abandon(self, name: str, rebuild_id: str, error: str) -> bool:
        """Stop writing the target generation; the current one stays as it is.

        Returns whether the rebuild was still ours to abandon.
        """
        result = await self._collection.update_one(
            {"_id": name, "rebuild.id": rebuild_id, "target": {"$ne": None}},
            {
                "$set": {
                    "target": None,
                    "rebuild.state": "failed",
                    "rebuild.error": error,
                    "rebuild.heartbeat": utcnow(),
                }
            },
        )
        return result.matched_count == 1

    async def retired(self, name: str, rebuild_id: str) -> None:
        await self._collection.update_one(
            {"_id": name, "rebuild.id": rebuild_id},
            {"$set": {"previous": None, "rebuild.state": "done", "rebuild.heartbeat": utcnow()}},
        )


async def ensure_indexes(
    database: AsyncDatabase[Document], model: ReadModel, generation: int
) -> None:
    collections = generation_collections(database, model.collections, generation)
    for name, indexes in model.indexes().items():
        if indexes:
            await collections[name].create_indexes(list(indexes))


async def drop_generations(
    database: AsyncDatabase[Document], model: ReadModel, keep: Iterable[int]
) -> list[str]:
    """Drop every generation of `model`'s collections except those in `keep`."""
    kept = set(keep)
    dropped = []
    for name in await database.list_collection_names():
        for collection in model.collections:
            generation = generation_of(name, collection)
            if generation is not None and generation not in kept:
                await database.drop_collection(name)
                dropped.append(name)
    return dropped


class FreshValue(Generic[T]):
    """A value loaded by a call that started after the caller asked: never older than the ask.

    Callers that ask while a load is running share the next load instead of starting their own,
    so under load there is about one load per round trip, not one per caller.
    """

    def __init__(self, load: Callable[[], Awaitable[T]]) -> None:
        self._load = load
        self._running: asyncio.Future[T] | None = None
        self._next: asyncio.Future[T] | None = None

    async def get(self) -> T:
        if self._running is None:
            self._running = self._start()
            return await asyncio.shield(self._running)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._next)

    def _start(self) -> asyncio.Future[T]:
        task = asyncio.ensure_future(self._load())
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Future[T]) -> None:
        self._running = None
        waiting, self._next = self._next, None
        if not task.cancelled():
            task.exception()  # retrieved: the callers awaiting it get it
        if waiting is None:
            return
        self._running = self._start()
        self._running.add_done_callback(lambda done: _copy(done, waiting))


def _copy(source: asyncio.Future[T], target: asyncio.Future[T]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


class ReadModelCatalog:
    """The read models, the collections of their generations, and where an event goes now.

    The projector asks `targets` for every event and the API asks `collection` for every query;
    both read the pointers fresh (see `FreshValue`), so after a switch nobody keeps writing or
    reading the old generation, and an event handled with pointers from before a rebuild began
    was published before it began, so the rebuild's first replay covers it.
    """

    def __init__(
        self,
        database: AsyncDatabase[Document],
        models: Iterable[ReadModel],
        registry: ReadModelRegistry,
    ) -> None:
        self._database = database
        self.models: dict[str, ReadModel] = {model.name: model for model in models}
        self.registry = registry
        self._states: FreshValue[dict[str, ModelState]] = FreshValue(registry.states)
        self._bound: dict[tuple[str, int], BatchProjection] = {}

    @property
    def database(self) -> AsyncDatabase[Document]:
        return self._database

    async def states(self) -> dict[str, ModelState]:
        found = await self._states.get()
        return {name: found.get(name, ModelState(name)) for name in self.models}

    async def state(self, name: str) -> ModelState:
        return (await self.states())[name]

    def collections(self, name: str, generation: int) -> dict[str, AsyncCollection[Document]]:
        return generation_collections(self._database, self.models[name].collections, generation)

    async def collection(self, name: str, logical: str | None = None) -> AsyncCollection[Document]:
        """The current generation of one of `name`'s collections (its main one by default)."""
        state = await self.state(name)
        model = self.models[name]
        return self.collections(name, state.current)[logical or model.collections[0]]

    def projection(self, name: str, generation: int) -> BatchProjection:
        key = (name, generation)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = self.models[name].bind(self.collections(name, generation))
        return bound

    async def targets(self, envelope: EventEnvelope) -> Targets:
        return (await self.targets_of([envelope]))[0]

    async def targets_of(self, envelopes: Sequence[EventEnvelope]) -> list[Targets]:
        """Where each of `envelopes` goes, from one fresh read of the generation pointers."""
        if not any(model.handles(e) for e in envelopes for model in self.models.values()):
            return [Targets(live=()) for _ in envelopes]
        states = await self.states()
        return [self._targets(envelope, states) for envelope in envelopes]

    def _targets(self, envelope: EventEnvelope, states: Mapping[str, ModelState]) -> Targets:
        wanted = [model for model in self.models.values() if model.handles(envelope)]
        if not wanted:
            return Targets(live=())
        live: list[Projection] = []
        shadows: list[Shadow] = []
        for model in wanted:
            state = states[model.name]
            live.append(self.projection(model.name, state.current))
            if state.target is not None:
                shadows.append(
                    Shadow(
                        self.projection(model.name, state.target),
                        on_skip=functools.partial(
                            self.registry.record_skip, model.name, state.target
                        ),
                    )
                )
        return Targets(live=live, shadows=shadows)

    async def ensure_current_indexes(self) -> None:
        for name, state in (await self.states()).items():
            await ensure_indexes(self._database, self.models[name], state.current)
            if state.target is not None:
                await ensure_indexes(self._database, self.models[name], state.target)


def build_catalog(
    database: AsyncDatabase[Document], read_models: Sequence[ReadModel]
) -> ReadModelCatalog:
    """`read_models` over `database`, with their generation pointers."""
    return ReadModelCatalog(
        database, list(read_models), ReadModelRegistry(database[READ_MODELS_COLLECTION])
    )
