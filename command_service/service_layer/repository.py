"""Loading aggregates from their events (through the latest snapshot), and snapshotting them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar
from uuid import UUID

import structlog

from command_service.model.aggregate import Aggregate
from command_service.service_layer.event_store import (
    EventStore,
    EventStoreUnavailableError,
    Snapshot,
    WrongAggregateTypeError,
)
from command_service.service_layer.registry import CommandRegistry
from shared.messages import Event

log = structlog.get_logger(__name__)

A = TypeVar("A", bound=Aggregate)


class AggregateRepository:
    """Rebuilds aggregates; takes a snapshot every `snapshot_every` versions (0: never)."""

    def __init__(self, store: EventStore, registry: CommandRegistry, snapshot_every: int) -> None:
        self._store = store
        self._registry = registry
        self._snapshot_every = snapshot_every

    def _snapshots(self, aggregate_class: type[Aggregate]) -> bool:
        return self._snapshot_every > 0 and aggregate_class.snapshot_schema is not None

    async def load(self, aggregate_class: type[A], aggregate_id: UUID) -> A:
        """The aggregate's current state.

        Raises `WrongAggregateTypeError` when the stream is another aggregate type's, so that
        nothing is decided on a history that is not this aggregate's.
        """
        snapshot = None
        if self._snapshots(aggregate_class):
            snapshot = await self._store.load_snapshot(aggregate_id)
            if snapshot is not None and (
                snapshot.schema_version != aggregate_class.snapshot_schema
                or snapshot.aggregate_type != aggregate_class.aggregate_type
            ):
                snapshot = None  # an older shape of the state: replay from the start instead
        after = snapshot.version if snapshot else 0
        history = await self._store.load_stream(aggregate_id, after_version=after)
        # A stream's type is its first event's (a snapshot is only kept when it is ours).
        wanted = aggregate_class.aggregate_type
        if snapshot is None and history and history[0].aggregate_type != wanted:
            raise WrongAggregateTypeError(aggregate_id, wanted, history[0].aggregate_type)
        events = (
            self._registry.event_from_stored(e.type, e.schema_version, e.data) for e in history
        )
        if snapshot is None:
            return aggregate_class.rehydrate(aggregate_id, events)
        aggregate = aggregate_class.from_snapshot(aggregate_id, snapshot.version, snapshot.state)
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
