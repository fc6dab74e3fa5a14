"""An in-memory `EventStore` for unit tests of the service layer."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from uuid import UUID

from command_service.service_layer.event_store import (
    Appending,
    BatchWrite,
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

    async def find_replies(
        self, command_ids: Sequence[UUID], *, internal: bool = False
    ) -> dict[UUID, Reply]:
        log = self._log(internal)
        return {command_id: log[command_id] for command_id in command_ids if command_id in log}

    async def load_snapshots(self, stream_ids: Sequence[UUID]) -> dict[UUID, Snapshot]:
        return {s: self.snapshots[s] for s in stream_ids if s in self.snapshots}

    async def load_streams(
        self, after_versions: Mapping[UUID, int]
    ) -> dict[UUID, list[StoredEvent]]:
        return {s: await self.load_stream(s, after) for s, after in after_versions.items()}

    async def append_batch(
        self, writes: Sequence[BatchWrite], *, internal: bool = False
    ) -> list[Reply]:
        """The single operations in turn, all undone when one of them fails."""
        saved = (
            list(self.events),
            dict(self.stream_types),
            copy.copy(self.replies),
            copy.copy(self.internal_replies),
        )
        replies: list[Reply] = []
        try:
            for write in writes:
                if isinstance(write, Appending):
                    replies.append(
                        await self.append(
                            stream_id=write.stream_id,
                            aggregate_type=write.aggregate_type,
                            expected_version=write.expected_version,
                            events=write.events,
                            command_id=write.command_id,
                            correlation_id=write.correlation_id,
                            user=write.user,
                            traceparent=write.traceparent,
                            internal=internal,
                        )
                    )
                else:
                    replies.append(await self.record_rejection(write, internal=internal))
        except Exception:
            self.events, self.stream_types, self.replies, self.internal_replies = saved
            raise
        return replies

    async def read_all(self, after: int, limit: int) -> list[StoredEvent]:
        return [e for e in self.events if e.position > after][:limit]
