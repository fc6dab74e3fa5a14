"""A domain's public contract, as clients take it: the commands they may send (and the events
they may see), in one object the domain's contracts module exposes as `contracts`.

`CQRS_DOMAINS` names the domains: a bare name (`ledger`) is a domain shipped with the services,
its contracts the module `shared.<name>`; a dotted name (`my_company.inventory`) is a package of
your own whose module `contracts` holds them. Clients (the `cqrs` tool) learn the command types
from here; the services load their own sides of the same domains.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shared.messages import Command, Event

BUILT_IN_PACKAGE = "shared"


@dataclass(frozen=True)
class DomainContracts:
    """The commands a client may send to one domain (internal ones, such as a process
    manager's steps, left out) and the events its aggregates record."""

    name: str
    commands: Sequence[type[Command]]
    events: Sequence[type[Event]] = ()


class ContractsError(Exception):
    """A domain's contracts cannot be loaded, or two domains name the same message type."""


def contracts_module(name: str) -> str:
    """The module that holds the contracts of domain `name` (see the module)."""
    if not name or name.strip() != name:
        raise ContractsError(f"a domain name may not be empty or padded: {name!r}")
    return f"{BUILT_IN_PACKAGE}.{name}" if "." not in name else f"{name}.contracts"


def load_contracts(names: Iterable[str]) -> list[DomainContracts]:
    """The contracts of the domains named, each module's `contracts` object; two domains may
    not name the same command or event type."""
    found = []
    for name in names:
        path = contracts_module(name)
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise ContractsError(f"domain {name!r}: cannot import {path}: {e}") from e
        contracts = getattr(module, "contracts", None)
        if not isinstance(contracts, DomainContracts):
            raise ContractsError(
                f"domain {name!r}: {path} has no `contracts = DomainContracts(...)`"
            )
        found.append(contracts)
    command_types(found)
    _unique("event", ((c.name, e.type_name()) for c in found for e in c.events))
    return found


def command_types(domains: Sequence[DomainContracts]) -> dict[str, type[Command]]:
    """Every command of `domains` by its type name; a name two domains use is an error."""
    owners = _unique("command", ((c.name, m.type_name()) for c in domains for m in c.commands))
    by_type = {m.type_name(): m for c in domains for m in c.commands}
    return {name: by_type[name] for name in owners}


def _unique(kind: str, named: Iterable[tuple[str, str]]) -> Mapping[str, str]:
    owners: dict[str, str] = {}
    for domain, type_name in named:
        holder = owners.setdefault(type_name, domain)
        if holder != domain:
            raise ContractsError(
                f"{kind} type {type_name!r} of domain {domain!r} is already defined by domain "
                f"{holder!r}: two domains may not share a {kind} type"
            )
    return owners
