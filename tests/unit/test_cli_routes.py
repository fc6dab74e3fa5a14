"""`cqrs get` finds routes, their names and parameters in the query API's OpenAPI document."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI

from cqrs_cli.openapi_routes import get_routes, route_name, routes_named
from query_service.entrypoints.api.app import create_app
from query_service.settings import QueryServiceSettings


def test_the_ledger_routes_are_found_by_the_names_they_were_declared_with() -> None:
    document = create_app(QueryServiceSettings()).openapi()
    routes = {route.name: route for route in get_routes(document)}
    assert {"account", "accounts", "transactions", "owner", "transfer"} <= set(routes)
    owner = routes["owner"]
    assert owner.path == "/owners/{owner_id}/summary"
    assert [p.name for p in owner.path_parameters] == ["owner_id"]
    assert [p.name for p in owner.query_parameters] == [
        "min_version",
        "min_position",
        "account_id",
        "limit",
        "cursor",
    ]
    assert routes["accounts"].path_parameters == ()
    status = next(p for p in routes["accounts"].query_parameters if p.name == "status")
    assert (status.kind, status.required) == ("open|frozen|closed", False)
    assert routes["transfer"].usage == (
        "transfer <transfer_id> [min_version=integer] [min_position=integer]"
    )
    assert routes["account"].summary.startswith("One account.")


def test_a_domain_route_is_named_as_declared_whatever_its_path() -> None:
    """A route of another domain, with names and paths FastAPI mangles alike."""
    router = APIRouter()

    @router.get("/carts/{cart_id}/items/{sku}", name="cart_item")
    async def cart_item(cart_id: str, sku: str, verbose: bool = False) -> dict[str, Any]:
        """One item of a cart."""
        return {}

    @router.get("/cart-items", name="cart-items")
    async def cart_items() -> list[dict[str, Any]]:
        return []

    app = FastAPI()
    app.include_router(router)
    routes = {route.name: route for route in get_routes(app.openapi())}
    # FastAPI's operation ids write `-` as `_`: listed so, found by either.
    assert set(routes) == {"cart_item", "cart_items"}
    assert routes_named("cart-items", list(routes.values())) == [routes["cart_items"]]
    assert routes_named("cart_items", list(routes.values())) == [routes["cart_items"]]
    assert routes_named("cart.item", list(routes.values())) == [routes["cart_item"]]
    assert routes_named("cart", list(routes.values())) == []
    item = routes["cart_item"]
    assert [p.name for p in item.path_parameters] == ["cart_id", "sku"]
    assert [(p.name, p.kind, p.default) for p in item.query_parameters] == [
        ("verbose", "boolean", False)
    ]
    assert item.usage == "cart_item <cart_id> <sku> [verbose=boolean]"


def test_other_operation_ids_are_the_names_themselves() -> None:
    assert route_name("listCarts", "/carts") == "listCarts"
    assert route_name("carts_carts_get", "/carts") == "carts"
    assert route_name("_carts_get", "/carts") == "_carts_get"
    assert route_name("", "/carts") == "/carts"


def test_path_values_follow_the_path_and_shared_parameters_are_resolved() -> None:
    document = {
        "paths": {
            "/a/{x}/b/{y}": {
                "parameters": [{"$ref": "#/components/parameters/Y"}],
                "get": {
                    "operationId": "pair",
                    "summary": "Two values",
                    "parameters": [
                        {"name": "x", "in": "path", "required": True, "schema": {}},
                        {"name": "q", "in": "query", "required": True, "schema": {}},
                    ],
                },
                "post": {"operationId": "not_a_read"},
            }
        },
        "components": {
            "parameters": {
                "Y": {"name": "y", "in": "path", "required": True, "schema": {"type": "integer"}}
            }
        },
    }
    (route,) = get_routes(document)
    assert [p.name for p in route.path_parameters] == ["x", "y"]
    assert route.usage == "pair <x> <y> q=value"
    assert route.summary == "Two values"
