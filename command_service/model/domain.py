"""A domain, as the command service takes it: its aggregates, process managers, upcasters and
authorization policy, in one object the domain package exposes as `domain`.

The framework knows no domain by name. `CQRS_DOMAINS` names the ones a service runs: a bare
name (`ledger`) is a domain shipped with the service, `command_service.domains.<name>`; a
dotted name (`my_company.inventory`) is a package of your own whose module `command` holds it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from command_service.model.aggregate import Aggregate
from command_service.model.authorization import AuthorizationPolicy
from command_service.model.process import ProcessManager

# An upcaster turns the data of an event stored at schema version N into version N + 1.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

BUILT_IN_PACKAGE = "command_service.domains"


@dataclass(frozen=True)
class UpcasterSpec:
    """`upcast` turns `event_type` data stored at `from_version` into `from_version + 1`."""

    event_type: str
    from_version: int
    upcast: Upcaster


@dataclass(frozen=True)
class CommandDomain:
    """Everything the command service needs of one domain.

    `policy` decides, for a client login (not a privileged one, not a process manager), whether
    it may send a command of this domain's aggregates; without one, only privileged logins may
    (when authorization is on).
    """

    name: str
    aggregates: Sequence[type[Aggregate]]
    process_managers: Sequence[ProcessManager] = ()
    upcasters: Sequence[UpcasterSpec] = ()
    policy: AuthorizationPolicy | None = None
    aggregate_types: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "aggregate_types", frozenset(a.aggregate_type for a in self.aggregates)
        )


class DomainSetupError(Exception):
    """A domain cannot be loaded, or clashes with another: the service does not start."""


def module_of(name: str, *, side: str, built_in: str) -> str:
    """The module holding domain `name` for one side (`command`, `query`, `contracts`)."""
    if not name or name.strip() != name:
        raise DomainSetupError(f"a domain name may not be empty or padded: {name!r}")
    return f"{built_in}.{name}" if "." not in name else f"{name}.{side}"


def load_command_domains(names: Sequence[str]) -> list[CommandDomain]:
    """The domains named (see the module), each module's `domain` object."""
    domains = []
    for name in names:
        path = module_of(name, side="command", built_in=BUILT_IN_PACKAGE)
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise DomainSetupError(f"domain {name!r}: cannot import {path}: {e}") from e
        domain = getattr(module, "domain", None)
        if not isinstance(domain, CommandDomain):
            raise DomainSetupError(f"domain {name!r}: {path} has no `domain = CommandDomain(...)`")
        domains.append(domain)
    return domains
