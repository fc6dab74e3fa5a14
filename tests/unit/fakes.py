"""An in-memory `EventStore` for unit tests of the service layer."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

from command_service.service_layer.event_store import (
    ConcurrencyError,
    DuplicateCommandError,
    NewEvent,
    Snapshot,
    StoredEvent,
    WrongAggregateTypeError,
)
from shared.messages import Reply


class FakeEventStore:
    """Keeps streams and command replies in dicts; can simulate a writer that races ahead.

    Like the PostgreSQL store, a stream's first append records its aggregate type
    (`stream_types`) and an append of another type is refused, and process managers' commands
    are recorded apart from clients' (`internal_replies`, `replies`).
    """

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.stream_types: dict[UUID, str] = {}
        self.replies: dict[UUID, Reply] = {}
        self.internal_replies: dict[UUID, Reply] = {}
        self.conflicts_to_inject = 0
        self.snapshots: dict[UUID, Snapshot] = {}

    async def load_stream(self, stream_id: UUID, after_version: int = 0) -> list[StoredEvent]:
        return [e for e in self.events if e.stream_id == stream_id and e.version > after_version]

    async def load_snapshot(self, stream_id: UUID) -> Snapshot | None:
        return self.snapshots.get(stream_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        stored = self.snapshots.get(snapshot.stream_id)
        if stored is None or stored.version < snapshot.version:
            self.snapshots[snapshot.stream_id] = snapshot

    def _log(self, internal: bool) -> dict[UUID, Reply]:
        return self.internal_replies if internal else self.replies

    async def find_reply(self, command_id: UUID, *, internal: bool = False) -> Reply | None:
        return self._log(internal).get(command_id)

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
        replies = self._log(internal)
        if self.conflicts_to_inject:
            self.conflicts_to_inject -= 1
            raise ConcurrencyError("injected")
        if command_id in replies:
            raise DuplicateCommandError(replies[command_id])
        current = len(await self.load_stream(stream_id))
        if current != expected_version:
            raise ConcurrencyError(f"at {current}")
        recorded = self.stream_types.setdefault(stream_id, aggregate_type)
        if recorded != aggregate_type:
            raise WrongAggregateTypeError(stream_id, aggregate_type, recorded)
        for i, event in enumerate(events):
            self.events.append(
                StoredEvent(
                    position=len(self.events) + 1,
                    event_id=event.event_id,
                    stream_id=stream_id,
                    aggregate_type=aggregate_type,
                    version=expected_version + 1 + i,
                    type=event.type,
                    schema_version=event.schema_version,
                    data=event.data,
                    metadata={
                        "correlation_id": correlation_id,
                        "causation_id": str(command_id),
                        "user": user,
                        **({"traceparent": traceparent} if traceparent else {}),
                    },
                    recorded_at=datetime.now(UTC),
                )
            )
        reply = Reply(
            command_id=command_id,
            status="accepted",
            aggregate_id=stream_id,
            version=expected_version + len(events),
            position=len(self.events),
        )
        replies[command_id] = reply
        return reply

    async def record_rejection(self, reply: Reply, *, internal: bool = False) -> Reply:
        return self._log(internal).setdefault(reply.command_id, reply)

    async def read_all(self, after: int, limit: int) -> list[StoredEvent]:
        return [e for e in self.events if e.position > after][:limit]
