"""The projection framework's contract: what a projection is and what applying an event returns.

A projection names itself, says which events it wants and applies one event at a time, reporting
whether the event changed the read model, was already applied, or cannot be applied yet because an
earlier version of the aggregate is missing. Nothing here knows the ledger.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from pydantic import ValidationError

from shared.messages import Event, EventEnvelope

E = TypeVar("E", bound=Event)


class ProjectionError(Exception):
    """Root of the errors a projection raises on purpose."""


class InvalidEvent(ProjectionError):
    """The event can never be applied (bad data, impossible version); it is parked, not retried."""


class ApplyStatus(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    GAP = "gap"


@dataclass(frozen=True)
class ApplyResult:
    """What applying one event to one read-model document did.

    `stored_version` is the document's version before the attempt; `None` means the aggregate is
    unknown to the projection.
    """

    status: ApplyStatus
    stored_version: int | None

    @classmethod
    def applied(cls, stored_version: int | None) -> ApplyResult:
        return cls(ApplyStatus.APPLIED, stored_version)

    @classmethod
    def duplicate(cls, stored_version: int | None) -> ApplyResult:
        return cls(ApplyStatus.DUPLICATE, stored_version)

    @classmethod
    def gap(cls, stored_version: int | None) -> ApplyResult:
        return cls(ApplyStatus.GAP, stored_version)


class Projection(Protocol):
    """A read model fed by events.

    `apply` must be idempotent and order-preserving: apply only the aggregate's next version,
    report an older one as `DUPLICATE` and a later one as `GAP` without touching the read model.
    It raises `InvalidEvent` for an event that can never be applied.
    """

    @property
    def name(self) -> str: ...

    def handles(self, envelope: EventEnvelope) -> bool: ...

    async def apply(self, envelope: EventEnvelope) -> ApplyResult: ...


class BatchProjection(Projection, Protocol):
    """A projection that can also apply a run of events (in position order) at once.

    The effect must equal applying them one by one with `apply`, duplicates and gaps included;
    a rebuild uses it to write a replay in few round trips.
    """

    async def apply_batch(self, envelopes: Sequence[EventEnvelope]) -> None: ...


Applied = ApplyResult | InvalidEvent
"""What applying one event of a batch did, or why it can never be applied."""


@runtime_checkable
class ManyProjection(Projection, Protocol):
    """A projection that applies the live projector's batch of events at once.

    `apply_many` takes events it handles, in delivery order (each aggregate's in version order,
    repeats and gaps possible), and returns one `Applied` each, in the same order: the result
    applying them one by one with `apply` would give, duplicates, gaps and invalid events
    included, written in few round trips (the versions read once, the events of one document
    folded into one write).
    """

    async def apply_many(self, envelopes: Sequence[EventEnvelope]) -> list[Applied]: ...


class CheckpointStore(Protocol):
    """Records, per projection, the highest global position it has processed."""

    async def advance(self, projection: str, position: int) -> None: ...

    async def position(self, projection: str) -> int | None: ...


def event_data(model: type[E], envelope: EventEnvelope) -> E:
    """Validate the envelope's `data` against the event's schema; a mismatch is `InvalidEvent`."""
    try:
        return model.model_validate(envelope.data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'data'}: {error['msg']}"
            for error in e.errors()
        )
        raise InvalidEvent(f"{envelope.type} data does not match its schema: {problems}") from e
