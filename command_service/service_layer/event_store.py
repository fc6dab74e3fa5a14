"""The event store port: what the service layer asks of an event store, and what it answers.

Append-only streams of events, the command log (with each command's reply, for idempotency) and
snapshots; the records they are read and written as, and the errors an implementation raises.
`adapters.postgres_event_store` implements it on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID, uuid4

from cqrs_runtime import tracing
from shared.messages import Event, EventEnvelope, EventMetadata, Reply


class EventStoreError(Exception):
    """Root of the event store's errors."""


class ConcurrencyError(EventStoreError):
    """Another writer appended to the stream first (`unique(stream_id, version)`)."""


class DuplicateCommandError(EventStoreError):
    """The command id was recorded already; carries the stored reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"command {reply.command_id} was handled already")
        self.reply = reply


class WrongAggregateTypeError(EventStoreError):
    """The stream holds another aggregate type's history (`streams`, invariant 10)."""

    def __init__(self, stream_id: UUID, aggregate_type: str, recorded_type: str | None) -> None:
        super().__init__(
            f"stream {stream_id} is of type {recorded_type or 'unknown'}, not {aggregate_type}"
        )
        self.stream_id = stream_id
        self.aggregate_type = aggregate_type
        self.recorded_type = recorded_type


class EventStoreUnavailableError(EventStoreError):
    """The database cannot be reached now; the operation may succeed when retried."""


@dataclass(frozen=True)
class NewEvent:
    """An event about to be appended."""

    event_id: UUID
    type: str
    schema_version: int
    data: dict[str, Any]

    @classmethod
    def from_event(cls, event: Event) -> NewEvent:
        return cls(uuid4(), event.type_name(), event.schema_version, event.model_dump(mode="json"))


@dataclass(frozen=True)
class Appending:
    """One command's accepted events, to be appended with the others of a batch
    (`EventStore.append_batch`); the fields are `EventStore.append`'s."""

    stream_id: UUID
    aggregate_type: str
    expected_version: int
    events: Sequence[NewEvent]
    command_id: UUID
    correlation_id: str | None
    user: str | None = None
    traceparent: str | None = None


# What a batch stores for one command: its events, or its rejection (a `Reply`).
BatchWrite = Appending | Reply


@dataclass(frozen=True)
class StoredEvent:
    """An event as recorded, separate from the domain event it came from."""

    position: int
    event_id: UUID
    stream_id: UUID
    aggregate_type: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime

    def to_envelope(self) -> EventEnvelope:
        """The envelope to publish. Metadata is taken as it can be: an older version may have
        stored values today's rules refuse, and an event is never held back for its metadata."""
        return EventEnvelope(
            event_id=self.event_id,
            type=self.type,
            aggregate_type=self.aggregate_type,
            aggregate_id=self.stream_id,
            version=self.version,
            position=self.position,
            recorded_at=self.recorded_at,
            data=self.data,
            metadata=EventMetadata(
                correlation_id=_text_or_none(self.metadata.get("correlation_id")),
                causation_id=_text_or_none(self.metadata.get("causation_id")),
                schema_version=self.schema_version,
                traceparent=(
                    traceparent
                    if tracing.is_traceparent(traceparent := self.metadata.get("traceparent"))
                    else None
                ),
            ),
        )


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Snapshot:
    """An aggregate's state at `version`, in the aggregate's snapshot `schema_version`."""

    stream_id: UUID
    aggregate_type: str
    version: int
    schema_version: int
    state: dict[str, Any]


class EventStore(Protocol):
    """Append-only storage of event streams, with the command log and snapshots."""

    async def load_stream(self, stream_id: UUID, after_version: int = 0) -> list[StoredEvent]: ...

    async def load_snapshot(self, stream_id: UUID) -> Snapshot | None: ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` unless a newer one is stored already."""
        ...

    async def find_reply(self, command_id: UUID, *, internal: bool = False) -> Reply | None:
        """The reply recorded for `command_id` in the clients' key space, or with `internal` in
        the process managers' one."""
        ...

    async def append(
        self,
        *,
        stream_id: UUID,
        aggregate_type: str,
        expected_version: int,
        events: Sequence[NewEvent],
        command_id: UUID,
        correlation_id: str | None,
        user: str | None = None,
        traceparent: str | None = None,
        internal: bool = False,
    ) -> Reply:
        """Append events after `expected_version` and record the command (in the key space
        `internal` selects); return its reply.

        Every event's metadata names `user`, who sent the command (None: nobody known).

        A stream's first append records `aggregate_type` as the stream's type; an append of
        another type raises `WrongAggregateTypeError` and appends nothing. Raises
        `ConcurrencyError` when the stream moved on, `DuplicateCommandError` when the command
        was recorded already.
        """
        ...

    async def record_rejection(self, reply: Reply, *, internal: bool = False) -> Reply:
        """Record a rejected command; return the reply stored first for that command id."""
        ...

    async def find_replies(
        self, command_ids: Sequence[UUID], *, internal: bool = False
    ) -> dict[UUID, Reply]:
        """`find_reply` for many command ids in one round trip: the ones recorded."""
        ...

    async def load_snapshots(self, stream_ids: Sequence[UUID]) -> dict[UUID, Snapshot]:
        """`load_snapshot` for many streams in one round trip: the ones that have one."""
        ...

    async def load_streams(
        self, after_versions: Mapping[UUID, int]
    ) -> dict[UUID, list[StoredEvent]]:
        """`load_stream` for many streams in one round trip: each stream's events after the
        version it is mapped to, in version order (an empty list for a stream without any)."""
        ...

    async def append_batch(
        self, writes: Sequence[BatchWrite], *, internal: bool = False
    ) -> list[Reply]:
        """Store a batch's outcomes in one transaction, in their order: the events of each
        `Appending` (positions in batch order, several for one stream one after the other) with
        its command record, and each rejection; return one reply per write.

        An `Appending` gets its `accepted` reply, a rejection the reply stored first for its
        command id (itself, or one recorded before). All or nothing: raises `ConcurrencyError`
        when a stream moved past an append's `expected_version` or another writer recorded an
        appending command's id first, `WrongAggregateTypeError` when another type's first
        append of a stream won a race; nothing of the batch is stored then.
        """
        ...

    async def read_all(self, after: int, limit: int) -> list[StoredEvent]: ...


class RetryLaterError(Exception):
    """Raised by a handler of stored events that cannot finish a batch now (a subscription's,
    e.g. a process manager's); the batch is run again later."""
