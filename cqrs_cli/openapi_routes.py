"""The query API's GET routes as its OpenAPI document (`GET /openapi.json`) describes them: a
name, a path, path and query parameters. `cqrs get` reads any domain's routes this way.

A route's name is the one it was declared with (`name=` in FastAPI), which FastAPI's default
operation ids start with: `<name>_<path, non-word characters as _>_get`
(`account_accounts__account_id__get`), with its own non-word characters as `_` too (a route
named `cart-items` is listed as `cart_items`, and found by either). An operation id of another
form is the name itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parameter:
    """One path or query parameter of a route."""

    name: str
    required: bool
    kind: str
    description: str = ""
    default: object = None

    @property
    def hint(self) -> str:
        """How to write it in `cqrs get`: `<name>` for a path value, `name=kind` otherwise."""
        return f"{self.name}={self.kind}"


@dataclass(frozen=True)
class Route:
    """One GET route of the query API."""

    name: str
    path: str
    summary: str
    path_parameters: tuple[Parameter, ...]
    query_parameters: tuple[Parameter, ...]

    @property
    def usage(self) -> str:
        """`account <account_id> [min_version=integer] ...`, for help and errors."""
        words = [self.name, *(f"<{p.name}>" for p in self.path_parameters)]
        words += [p.hint if p.required else f"[{p.hint}]" for p in self.query_parameters]
        return " ".join(words)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "summary": self.summary,
            "path_parameters": [p.name for p in self.path_parameters],
            "query_parameters": [
                {
                    "name": p.name,
                    "required": p.required,
                    "type": p.kind,
                    "default": p.default,
                    "description": p.description,
                }
                for p in self.query_parameters
            ],
        }


def get_routes(document: Mapping[str, Any]) -> list[Route]:
    """Every GET route of an OpenAPI document, in its order."""
    routes = []
    components = document.get("components", {})
    for path, operations in (document.get("paths") or {}).items():
        operation = operations.get("get") if isinstance(operations, dict) else None
        if not isinstance(operation, dict):
            continue
        declared = [
            _resolve(raw, components)
            for raw in [*operations.get("parameters", []), *operation.get("parameters", [])]
        ]
        in_path = {str(p.get("name")): _parameter(p) for p in declared if p.get("in") == "path"}
        in_query = tuple(_parameter(p) for p in declared if p.get("in") == "query")
        # Path values are given in the order the path names them.
        ordered = tuple(in_path[n] for n in re.findall(r"{([^}/]+)}", str(path)) if n in in_path)
        routes.append(
            Route(
                name=route_name(str(operation.get("operationId") or ""), str(path)),
                path=str(path),
                summary=_first_line(operation),
                path_parameters=ordered,
                query_parameters=in_query,
            )
        )
    return routes


def route_name(operation_id: str, path: str) -> str:
    """The route's declared name, from FastAPI's default operation id (see the module)."""
    suffix = re.sub(r"\W", "_", path) + "_get"
    if operation_id.endswith(suffix) and len(operation_id) > len(suffix):
        return operation_id.removesuffix(suffix)
    return operation_id or path


def routes_named(name: str, routes: Sequence[Route]) -> list[Route]:
    """The routes called `name`, as listed or as declared (see the module)."""
    exact = [route for route in routes if route.name == name]
    return exact or [route for route in routes if route.name == re.sub(r"\W", "_", name)]


def _resolve(raw: Any, components: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(raw, dict) and isinstance(raw.get("$ref"), str):
        # '#/components/parameters/Name'
        parts = raw["$ref"].removeprefix("#/components/").split("/")
        found: Any = components
        for part in parts:
            found = found.get(part, {}) if isinstance(found, dict) else {}
        return found if isinstance(found, dict) else {}
    return raw if isinstance(raw, dict) else {}


def _parameter(raw: Mapping[str, Any]) -> Parameter:
    schema = raw.get("schema") or {}
    return Parameter(
        name=str(raw.get("name", "")),
        required=bool(raw.get("required", False)),
        kind=_kind(schema),
        description=str(raw.get("description") or schema.get("description") or ""),
        default=schema.get("default"),
    )


def _kind(schema: Mapping[str, Any]) -> str:
    """A short name for what a parameter takes: `uuid`, `integer`, `open|frozen|closed`..."""
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        kinds = [_kind(option) for option in options if option.get("type") != "null"]
        return "|".join(dict.fromkeys(kinds)) or "null"
    if "enum" in schema:
        return "|".join(str(value) for value in schema["enum"])
    kind = schema.get("format") or schema.get("type") or "value"
    return "|".join(kind) if isinstance(kind, list) else str(kind)


def _first_line(operation: Mapping[str, Any]) -> str:
    text = str(operation.get("description") or operation.get("summary") or "")
    return text.strip().splitlines()[0] if text.strip() else ""
