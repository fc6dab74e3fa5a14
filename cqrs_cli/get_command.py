"""`cqrs get <route> [path values...] [name=value ...]`: any GET route of the query API.

The routes come from the API's OpenAPI document (`cqrs_cli.openapi_routes`), so a domain's
routes work without edits here. Path values are given in order, query parameters as
`name=value`; `cqrs get` alone lists the routes. The answer is a table (an object's fields as
rows, each list of objects as a table of its own) or, with `--json`, the JSON as it came.

Exit 0: found; 1: not found, refused or an unknown route or parameter (the reason on stderr);
2: the API does not answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cqrs_cli.common import (
    JsonOption,
    QueryUrlOption,
    expect_ok,
    fail,
    http_get,
    out,
    print_json,
    query_url,
)
from cqrs_cli.openapi_routes import Route, get_routes, routes_named

# A route that pages takes `cursor` and answers with the next one as `next_cursor`.
CURSOR = "cursor"
NEXT_CURSOR = "next_cursor"
# Columns keep at least this much of a value (a UUID) before the table wraps them.
MIN_COLUMN_WIDTH = 36


def get(
    name: Annotated[
        str | None,
        typer.Argument(help="a route of the query API; none: list them", show_default=False),
    ] = None,
    values: Annotated[
        list[str] | None,
        typer.Argument(
            help="the route's path values in order, then its query parameters as name=value",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    url: QueryUrlOption = None,
) -> None:
    """Read from the query service: any GET route of its API, as a table or as JSON.

    `cqrs get` lists the routes and their parameters, e.g.
    `cqrs get account <id> min_version=3`, `cqrs get accounts owner_id=alice limit=10`.
    """
    base = query_url(url)
    document = expect_ok(http_get(base, "/openapi.json"), "the query API's OpenAPI document")
    routes = get_routes(document)
    if name is None:
        show_routes(routes, as_json=as_json)
        return
    route = _route_named(name, routes)
    path, params, path_values = _request(route, values or [])
    what = " ".join([name, *path_values])
    response = http_get(base, path, params)
    if response.is_success and "json" not in response.headers.get("content-type", ""):
        typer.echo(response.text)  # a route that answers something else: as it came
        return
    body = expect_ok(response, what)
    if as_json:
        print_json(body)
    else:
        pages = any(p.name == CURSOR for p in route.query_parameters)
        show(body, title=what, next_page=NEXT_CURSOR if pages else None)


def _route_named(name: str, routes: list[Route]) -> Route:
    found = routes_named(name, routes)
    if not found:
        fail(f"no route {name!r}; the query API has: " + ", ".join(r.name for r in routes))
    if len(found) > 1:
        fail(f"{len(found)} routes are named {name!r}: " + ", ".join(r.path for r in found))
    return found[0]


def _request(route: Route, values: list[str]) -> tuple[str, dict[str, str | list[str]], list[str]]:
    """The path with its values filled in, the query parameters, and the path values."""
    known = {p.name for p in route.query_parameters}
    params: dict[str, str | list[str]] = {}
    positional: list[str] = []
    for value in values:
        key, sep, given = value.partition("=")
        if sep and key in known:
            previous = params.get(key)
            if previous is None:
                params[key] = given
            else:  # named twice: an array parameter
                params[key] = [*([previous] if isinstance(previous, str) else previous), given]
        else:
            positional.append(value)
    expected = route.path_parameters
    if len(positional) != len(expected):
        extra = positional[len(expected) :]
        reason = (
            f"{len(expected)} path value(s) expected, {len(positional)} given"
            if not extra or "=" not in extra[0]
            else f"no query parameter {extra[0].partition('=')[0]!r}"
        )
        fail(f"{reason}; usage: cqrs get {route.usage}")
    path = route.path
    for parameter, value in zip(expected, positional, strict=True):
        path = path.replace("{" + parameter.name + "}", quote(value, safe=""))
    return path, params, positional


def show_routes(routes: list[Route], *, as_json: bool) -> None:
    if as_json:
        print_json([route.as_dict() for route in routes])
        return
    table = Table(title="routes of the query API: cqrs get <route> [path values] [name=value]")
    for column in ("route", "path", "parameters", "what"):
        table.add_column(column)
    for route in routes:
        parameters = [f"<{p.name}>" for p in route.path_parameters]
        parameters += [p.hint + ("" if p.required else "?") for p in route.query_parameters]
        table.add_row(
            Text(route.name, style="bold"),
            Text(route.path),
            Text(" ".join(parameters)),
            Text(route.summary),
        )
    out().print(table)


def show(body: Any, *, title: str, next_page: str | None = None) -> None:
    """An answer as tables: an object's scalar fields as rows (nested objects flattened as
    `a.b`), each of its lists of objects as a table; a list of objects as one table. The
    field `next_page` names (a page's next cursor) is shown as the `cursor=` to pass next."""
    if isinstance(body, list):
        out().print(_table(title, body))
        return
    if not isinstance(body, dict):
        print_json(body)
        return
    rows: list[tuple[str, Any]] = []
    tables: list[Table] = []
    for key, value in body.items():
        if key == next_page:
            continue
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            tables.append(_table(key, value))
        else:
            rows.extend(_flat(key, value))
    if rows:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in rows:
            grid.add_row(Text(key), _cell(value))
        out().print(Panel(grid, title=escape(title), expand=False))
    for table in tables:
        out().print(table)
    if next_page is not None and body.get(next_page):
        out().print(Text(f"more: {CURSOR}={body[next_page]}", style="dim"))


def _flat(key: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [row for k, v in value.items() for row in _flat(f"{key}.{k}", v)]
    return [(key, value)]


def _table(title: str, items: list[Any]) -> Table:
    rows = [dict(_flat_item(item)) for item in items]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=escape(f"{title} ({len(items)})"))
    for column in columns:
        widest = max((len(_text(row.get(column))) for row in rows), default=0)
        numeric = all(isinstance(row.get(column), int | float | type(None)) for row in rows)
        table.add_column(
            column,
            justify="right" if numeric else "left",
            min_width=min(widest, MIN_COLUMN_WIDTH),
        )
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    return table


def _flat_item(item: Any) -> list[tuple[str, Any]]:
    if isinstance(item, dict):
        return [row for key, value in item.items() for row in _flat(key, value)]
    return [("value", item)]


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if value == []:
        return "(none)"
    return json.dumps(value, default=str)


def _cell(value: Any) -> Text:
    return Text(_text(value))
