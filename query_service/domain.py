"""A domain, as the query service takes it: its read models and the routes that serve them, in
one object the domain package exposes as `domain`.

The framework knows no domain by name. `CQRS_DOMAINS` names the ones a service runs: a bare
name (`ledger`) is a domain shipped with the service, `query_service.domains.<name>`; a dotted
name (`my_company.inventory`) is a package of your own whose module `query` holds it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.routing import APIRoute

from query_service.projections.read_model import ReadModel

BUILT_IN_PACKAGE = "query_service.domains"


@dataclass(frozen=True)
class QueryDomain:
    """Everything the query service needs of one domain: the read models it projects (and
    rebuilds), and the routes that read them (built with `query_service.entrypoints.api`)."""

    name: str
    read_models: Sequence[ReadModel]
    routes: APIRouter | None = None


class DomainSetupError(Exception):
    """A domain cannot be loaded, or clashes with another: the service does not start."""


def load_query_domains(names: Sequence[str]) -> list[QueryDomain]:
    """The domains named (see the module), each module's `domain` object."""
    domains = []
    for name in names:
        path = f"{BUILT_IN_PACKAGE}.{name}" if "." not in name else f"{name}.query"
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise DomainSetupError(f"domain {name!r}: cannot import {path}: {e}") from e
        domain = getattr(module, "domain", None)
        if not isinstance(domain, QueryDomain):
            raise DomainSetupError(f"domain {name!r}: {path} has no `domain = QueryDomain(...)`")
        domains.append(domain)
    return domains


def read_models_of(domains: Sequence[QueryDomain]) -> list[ReadModel]:
    """Every read model of `domains`; no two may share a name or a collection, whether of one
    domain or of two (the catalog would keep one of them, silently)."""
    found: list[ReadModel] = []
    owners: dict[str, str] = {}
    for domain in domains:
        for model in domain.read_models:
            for key in (
                f"read model {model.name!r}",
                *(f"collection {c!r}" for c in model.collections),
            ):
                holder = owners.setdefault(key, domain.name)
                if holder != domain.name or model.name in {m.name for m in found}:
                    raise DomainSetupError(
                        f"{key} of domain {domain.name!r} is already defined by domain "
                        f"{holder!r}: two read models may not share a name or a collection"
                    )
            found.append(model)
    return found


FRAMEWORK = "the framework"


def check_routes(routers: Sequence[tuple[str, APIRouter]]) -> None:
    """No method and path served by two routes, no name given to two (`cqrs get` finds a route
    by its name): FastAPI would serve whichever came first. `routers` pairs each router with
    who brings it, a domain's name or `FRAMEWORK`."""
    owners: dict[str, str] = {}
    for owner, router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            keys = [f"route {method} {route.path}" for method in sorted(route.methods or ())]
            for key in [*keys, f"route name {route.name!r}"]:
                holder = owners.setdefault(key, owner)
                if holder != owner:
                    raise DomainSetupError(
                        f"{key} of {_who(owner)} is already served by {_who(holder)}: two "
                        "routes may not share a method and path, or a name"
                    )


def _who(owner: str) -> str:
    return owner if owner == FRAMEWORK else f"domain {owner!r}"
