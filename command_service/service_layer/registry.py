"""Which aggregate decides which command, and how stored events are read back.

The framework's dispatch table: a user adds an aggregate by registering it here from the
composition root; nothing else in the framework changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from command_service.domain.aggregate import Aggregate
from shared.messages import Command, CommandEnvelope, Event

# An upcaster turns the data of an event stored at schema version N into version N + 1.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class UnknownCommandError(LookupError):
    """The command type is not registered."""


class UnknownEventError(LookupError):
    """A stored event type is not registered: a deployment error, not bad input."""


class CommandRegistry:
    """Maps command types to aggregate classes and event types to their models."""

    def __init__(self) -> None:
        self._commands: dict[str, tuple[type[Command], type[Aggregate]]] = {}
        self._internal: dict[str, tuple[type[Command], type[Aggregate]]] = {}
        self._events: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, aggregate: type[Aggregate]) -> None:
        for command in aggregate.commands:
            self._commands[command.type_name()] = (command, aggregate)
        for command in aggregate.internal_commands:
            self._internal[command.type_name()] = (command, aggregate)
        for event in aggregate.events:
            self._events[event.type_name()] = event

    def register_upcaster(self, event_type: str, from_version: int, upcaster: Upcaster) -> None:
        self._upcasters[(event_type, from_version)] = upcaster

    @property
    def command_types(self) -> Iterable[str]:
        return self._commands.keys()

    def parse(
        self, envelope: CommandEnvelope, *, internal: bool = False
    ) -> tuple[Command, type[Aggregate]]:
        """The typed command and the aggregate that decides it.

        Internal commands are found only when `internal` is true (process managers).
        Raises `UnknownCommandError`, or pydantic's `ValidationError` for a bad payload.
        """
        found = self._commands.get(envelope.type)
        if found is None and internal:
            found = self._internal.get(envelope.type)
        if found is None:
            raise UnknownCommandError(f"unknown command type {envelope.type!r}")
        command_class, aggregate = found
        return command_class.model_validate(envelope.payload), aggregate

    def event_from_stored(
        self, event_type: str, schema_version: int, data: dict[str, Any]
    ) -> Event:
        """Rebuild a domain event, upcasting data stored under an older schema version."""
        try:
            event_class = self._events[event_type]
        except KeyError:
            raise UnknownEventError(f"no event type {event_type!r} is registered") from None
        version = schema_version
        while version < event_class.schema_version:
            data = self._upcasters[(event_type, version)](data)
            version += 1
        return event_class.model_validate(data)
