"""The framework's aggregate base: state rebuilt from events, decisions returned as new events."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Self
from uuid import UUID

from shared.messages import Command, Event


class DomainError(Exception):
    """A command the aggregate's rules reject. A normal answer to the sender, not a failure."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Aggregate(ABC):
    """An event-sourced aggregate.

    Subclasses set `aggregate_type`, the `commands` they decide on (`internal_commands`: those
    only process managers may issue, never accepted from the broker) and the `events` they
    apply, and implement `apply` (evolve state by one event, no validation: events are facts) and
    `decide` (return the new events for a command, or raise `DomainError`).
    """

    aggregate_type: ClassVar[str]
    commands: ClassVar[tuple[type[Command], ...]]
    internal_commands: ClassVar[tuple[type[Command], ...]] = ()
    events: ClassVar[tuple[type[Event], ...]]
    # Set to a version number to allow snapshots (and implement the two methods below); bump
    # it when the state's shape changes, and older snapshots are ignored.
    snapshot_schema: ClassVar[int | None] = None

    def __init__(self, aggregate_id: UUID) -> None:
        self.id = aggregate_id
        self.version = 0

    @classmethod
    def rehydrate(cls, aggregate_id: UUID, history: Iterable[Event]) -> Self:
        aggregate = cls(aggregate_id)
        for event in history:
            aggregate.apply(event)
            aggregate.version += 1
        return aggregate

    @classmethod
    def from_snapshot(cls, aggregate_id: UUID, version: int, state: dict[str, Any]) -> Self:
        aggregate = cls(aggregate_id)
        aggregate.restore_state(state)
        aggregate.version = version
        return aggregate

    def snapshot_state(self) -> dict[str, Any]:
        """The state as JSON-ready data, for aggregates that set `snapshot_schema`."""
        raise NotImplementedError

    def restore_state(self, state: dict[str, Any]) -> None:
        """The reverse of `snapshot_state`."""
        raise NotImplementedError

    @abstractmethod
    def apply(self, event: Event) -> None:
        """Evolve the state by one event."""

    @abstractmethod
    def decide(self, command: Command) -> Sequence[Event]:
        """The events that the command causes, given the current state."""
