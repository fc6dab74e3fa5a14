"""Which aggregate decides which command, and how stored events are read back.

The framework's dispatch table, built from the domains the service runs (`from_domains`). Two
domains may not name the same aggregate, command or event type: that is refused when the
service starts, never settled by whichever registered last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from command_service.model.aggregate import Aggregate
from command_service.model.domain import CommandDomain, DomainSetupError, Upcaster
from shared.messages import Command, CommandEnvelope, Event


class UnknownCommandError(LookupError):
    """The command type is not registered."""


class UnknownEventError(LookupError):
    """A stored event type is not registered: a deployment error, not bad input."""


@dataclass(frozen=True)
class ParsedCommand:
    """A command envelope with its payload parsed: the typed command and the aggregate class
    that decides it. Parsed once, where the command enters, and handed on as it is."""

    envelope: CommandEnvelope
    command: Command
    aggregate: type[Aggregate]


class CommandRegistry:
    """Maps command types to aggregate classes and event types to their models."""

    def __init__(self) -> None:
        self._commands: dict[str, tuple[type[Command], type[Aggregate]]] = {}
        self._internal: dict[str, tuple[type[Command], type[Aggregate]]] = {}
        self._events: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._aggregates: dict[str, type[Aggregate]] = {}
        self._owners: dict[str, str] = {}  # "kind name" -> the aggregate that has it

    @classmethod
    def from_domains(cls, domains: Sequence[CommandDomain]) -> CommandRegistry:
        """Every aggregate and upcaster of `domains`; raises `DomainSetupError` on a clash."""
        registry = cls()
        for domain in domains:
            for aggregate in domain.aggregates:
                registry.register(aggregate, domain=domain.name)
            for spec in domain.upcasters:
                registry.register_upcaster(spec.event_type, spec.from_version, spec.upcast)
        return registry

    def register(self, aggregate: type[Aggregate], *, domain: str | None = None) -> None:
        owner = f"aggregate {aggregate.__name__}" + (f" of domain {domain!r}" if domain else "")
        self._claim("aggregate type", aggregate.aggregate_type, owner)
        self._aggregates[aggregate.aggregate_type] = aggregate
        for command in (*aggregate.commands, *aggregate.internal_commands):
            self._claim("command type", command.type_name(), owner)
        for command in aggregate.commands:
            self._commands[command.type_name()] = (command, aggregate)
        for command in aggregate.internal_commands:
            self._internal[command.type_name()] = (command, aggregate)
        for event in aggregate.events:
            # One event class may serve two aggregates; two classes may not share a name.
            if self._events.get(event.type_name()) is not event:
                self._claim("event type", event.type_name(), owner)
            self._events[event.type_name()] = event

    def _claim(self, kind: str, name: str, owner: str) -> None:
        holder = self._owners.setdefault(f"{kind} {name}", owner)
        if holder != owner:
            raise DomainSetupError(
                f"{kind} {name!r} of {owner} is already registered by {holder}: "
                "two domains (or aggregates) may not share a name"
            )

    def register_upcaster(self, event_type: str, from_version: int, upcaster: Upcaster) -> None:
        self._upcasters[(event_type, from_version)] = upcaster

    @property
    def command_types(self) -> Iterable[str]:
        return self._commands.keys()

    @property
    def aggregates(self) -> Mapping[str, type[Aggregate]]:
        """Aggregate type -> its class."""
        return self._aggregates

    def parse(self, envelope: CommandEnvelope, *, internal: bool = False) -> ParsedCommand:
        """The typed command and the aggregate that decides it.

        Internal commands are found only when `internal` is true (process managers).
        Raises `UnknownCommandError`, or pydantic's `ValidationError` for a bad payload.
        """
        command_class, aggregate = self._lookup(envelope.type, internal)
        return ParsedCommand(envelope, command_class.model_validate(envelope.payload), aggregate)

    def resolve(
        self, envelope: CommandEnvelope, command: Command, *, internal: bool = False
    ) -> ParsedCommand:
        """A command built typed already (a process manager's step), sent as `envelope`: the
        aggregate that decides it, without parsing it again. Raises `UnknownCommandError` when
        its type is not registered, or is registered for another command class."""
        command_class, aggregate = self._lookup(envelope.type, internal)
        if type(command) is not command_class:
            raise UnknownCommandError(
                f"command type {envelope.type!r} is registered for {command_class.__name__}, "
                f"not {type(command).__name__}"
            )
        return ParsedCommand(envelope, command, aggregate)

    def _lookup(self, command_type: str, internal: bool) -> tuple[type[Command], type[Aggregate]]:
        found = self._commands.get(command_type)
        if found is None and internal:
            found = self._internal.get(command_type)
        if found is None:
            raise UnknownCommandError(f"unknown command type {command_type!r}")
        return found

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
