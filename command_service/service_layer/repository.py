"""Loading aggregates from their events (through the latest snapshot), and snapshotting them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import structlog

from command_service.model.aggregate import Aggregate
from command_service.service_layer.event_store import (
    EventStore,
    EventStoreUnavailableError,
    Snapshot,
    StoredEvent,
    WrongAggregateTypeError,
)
from command_service.service_layer.registry import CommandRegistry
from shared.messages import Event

log = structlog.get_logger(__name__)

A = TypeVar("A", bound=Aggregate)


@dataclass(frozen=True)
class LoadedStream:
    """A stream as loaded for a batch: the snapshot it was loaded from (None: from its start)
    and its events after that."""

    stream_id: UUID
    snapshot: Snapshot | None
    history: list[StoredEvent]

    @property
    def recorded_type(self) -> str | None:
        """The stream's aggregate type (None: no such stream yet)."""
        if self.snapshot is not None:
            return self.snapshot.aggregate_type
        return self.history[0].aggregate_type if self.history else None


class AggregateRepository:
    """Rebuilds aggregates; takes a snapshot every `snapshot_every` versions (0: never)."""

    def __init__(self, store: EventStore, registry: CommandRegistry, snapshot_every: int) -> None:
        self._store = store
        self._registry = registry
        self._snapshot_every = snapshot_every

    def _snapshots(self, aggregate_class: type[Aggregate]) -> bool:
        return self._snapshot_every > 0 and aggregate_class.snapshot_schema is not None

    def _usable(self, snapshot: Snapshot | None, aggregate_class: type[Aggregate]) -> bool:
        # Another shape of the state (or another type's): replay from the start instead.
        return (
            snapshot is not None
            and self._snapshots(aggregate_class)
            and snapshot.schema_version == aggregate_class.snapshot_schema
            and snapshot.aggregate_type == aggregate_class.aggregate_type
        )

    async def load(self, aggregate_class: type[A], aggregate_id: UUID) -> A:
        """The aggregate's current state.

        Raises `WrongAggregateTypeError` when the stream is another aggregate type's, so that
        nothing is decided on a history that is not this aggregate's.
        """
        snapshot = None
        if self._snapshots(aggregate_class):
            snapshot = await self._store.load_snapshot(aggregate_id)
            if not self._usable(snapshot, aggregate_class):
                snapshot = None
        after = snapshot.version if snapshot else 0
        history = await self._store.load_stream(aggregate_id, after_version=after)
        return self.rebuild(aggregate_class, LoadedStream(aggregate_id, snapshot, history))

    async def load_many(self, wanted: Mapping[UUID, type[Aggregate]]) -> dict[UUID, LoadedStream]:
        """Several streams in one round trip for snapshots and one for events, each for the
        aggregate class it is mapped to (`rebuild` makes the aggregates)."""
        snapshotted = [stream for stream, cls in wanted.items() if self._snapshots(cls)]
        found = await self._store.load_snapshots(snapshotted) if snapshotted else {}
        snapshots = {
            stream: snapshot
            for stream, snapshot in found.items()
            if self._usable(snapshot, wanted[stream])
        }
        after = {stream: s.version for stream, s in snapshots.items()}
        histories = await self._store.load_streams(
            {stream: after.get(stream, 0) for stream in wanted}
        )
        return {
            stream: LoadedStream(stream, snapshots.get(stream), histories.get(stream, []))
            for stream in wanted
        }

    def rebuild(self, aggregate_class: type[A], loaded: LoadedStream) -> A:
        """The aggregate from a loaded stream; raises `WrongAggregateTypeError` when the stream
        is another aggregate type's."""
        wanted = aggregate_class.aggregate_type
        recorded = loaded.recorded_type
        # A stream's type is its first event's (a snapshot is only kept when it is ours).
        if recorded is not None and recorded != wanted:
            raise WrongAggregateTypeError(loaded.stream_id, wanted, recorded)
        events = (
            self._registry.event_from_stored(e.type, e.schema_version, e.data)
            for e in loaded.history
        )
        snapshot = loaded.snapshot
        if snapshot is None:
            return aggregate_class.rehydrate(loaded.stream_id, events)
        aggregate = aggregate_class.from_snapshot(
            loaded.stream_id, snapshot.version, snapshot.state
        )
        for event in events:
            aggregate.apply(event)
            aggregate.version += 1
        return aggregate

    async def appended(self, aggregate: Aggregate, events: Sequence[Event]) -> None:
        """Snapshot when the new events cross a multiple of `snapshot_every`."""
        if not self._snapshots(type(aggregate)):
            return
        before = aggregate.version
        after = before + len(events)
        if after // self._snapshot_every == before // self._snapshot_every:
            return
        for event in events:
            aggregate.apply(event)
            aggregate.version += 1
        await self._save(aggregate)

    async def advanced(self, aggregate: Aggregate, since: int) -> None:
        """Snapshot an aggregate whose state includes its new events (it was at version
        `since` before them) when they crossed a multiple of `snapshot_every`."""
        if not self._snapshots(type(aggregate)):
            return
        if aggregate.version // self._snapshot_every == since // self._snapshot_every:
            return
        await self._save(aggregate)

    async def _save(self, aggregate: Aggregate) -> None:
        assert aggregate.snapshot_schema is not None
        try:
            await self._store.save_snapshot(
                Snapshot(
                    stream_id=aggregate.id,
                    aggregate_type=aggregate.aggregate_type,
                    version=aggregate.version,
                    schema_version=aggregate.snapshot_schema,
                    state=aggregate.snapshot_state(),
                )
            )
        except EventStoreUnavailableError as e:
            # The events committed; a missing snapshot only costs a longer load next time.
            log.warning("snapshot_skipped", aggregate_id=str(aggregate.id), error=str(e))
