"""The cart as the query service runs it: the `carts` read model and `GET /carts/{cart_id}`.

Document (collection `carts_v<generation>`): `_id` = cart id, `id`, `items` (`{sku: {quantity,
unit_price}}`), `total_quantity`, `total_amount` (minor units), `opened_at`, `updated_at`; the
framework adds `version` and `last_position`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final
from uuid import UUID

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from query_service.domain import QueryDomain
from query_service.entrypoints.api.dependencies import Catalog
from query_service.entrypoints.api.errors import FRESHNESS
from query_service.entrypoints.api.freshness import Freshness, FreshReads
from query_service.projections.base import InvalidEvent
from query_service.projections.document import DocumentReadModel, DocumentRules
from query_service.service_layer.catalog import ReadModelCatalog
from shared.messages import Event, EventEnvelope
from tests.domains.cart.contracts import CART, EVENTS, CartOpened, ItemAdded, ItemRemoved

NAME: Final = "carts"


def opened_cart(event: CartOpened, envelope: EventEnvelope) -> dict[str, Any]:
    return {
        "id": str(envelope.aggregate_id),
        "items": {},
        "total_quantity": 0,
        "total_amount": 0,
        "opened_at": envelope.recorded_at,
        "updated_at": envelope.recorded_at,
    }


def cart_update(event: Event, envelope: EventEnvelope) -> dict[str, Any]:
    """The update one event makes; `version` and `last_position` are the framework's."""
    match event:
        case ItemAdded(sku=sku, quantity=quantity, unit_price=unit_price):
            return {
                "$set": {f"items.{sku}.unit_price": unit_price, "updated_at": envelope.recorded_at},
                "$inc": {
                    f"items.{sku}.quantity": quantity,
                    "total_quantity": quantity,
                    "total_amount": quantity * unit_price,
                },
            }
        case ItemRemoved(sku=sku, quantity=quantity, unit_price=unit_price):
            return {
                "$unset": {f"items.{sku}": ""},
                "$set": {"updated_at": envelope.recorded_at},
                "$inc": {"total_quantity": -quantity, "total_amount": -quantity * unit_price},
            }
    raise InvalidEvent(f"{event.type_name()} does not change an existing cart")


RULES: Final = DocumentRules(
    name=NAME,
    aggregate_type=CART,
    events=EVENTS,
    creating=CartOpened,
    created=opened_cart,
    updated=cart_update,  # read by `_id` only: no secondary index
)


class CartLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    sku: str
    quantity: int
    unit_price: int
    amount: int = Field(description="quantity times unit price, minor units")


class CartView(BaseModel):
    """A cart as the API shows it: its lines in SKU order and its totals."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    items: list[CartLine]
    total_quantity: int
    total_amount: int
    version: int = Field(description="the cart's event version this reflects")
    last_position: int
    opened_at: datetime
    updated_at: datetime


async def cart_detail(cart_id: UUID, *, catalog: ReadModelCatalog) -> CartView | None:
    """The cart with this id, or `None` when the read model does not know it (yet)."""
    collection = await catalog.collection(NAME)
    found = await collection.find_one({"_id": str(cart_id)}, {"_id": 0})
    if found is None:
        return None
    lines = [
        CartLine(
            sku=sku,
            quantity=line["quantity"],
            unit_price=line["unit_price"],
            amount=line["quantity"] * line["unit_price"],
        )
        for sku, line in sorted(found.pop("items").items())
    ]
    return CartView.model_validate({**found, "items": lines})


router = APIRouter(tags=["cart"])


@router.get("/carts/{cart_id}", response_model=CartView, responses=FRESHNESS, name="cart")
async def get_cart(
    cart_id: UUID, params: Annotated[Freshness, Query()], catalog: Catalog, fresh: FreshReads
) -> CartView:
    """One cart. With `min_version`/`min_position`, waits for the projection to get there."""
    cart = await fresh.read(
        lambda: cart_detail(cart_id, catalog=catalog),
        params,
        reached=lambda view: (view.version, view.last_position),
        what=f"cart {cart_id}",
    )
    if cart is None:
        raise HTTPException(status_code=404, detail="cart not found")
    return cart


domain = QueryDomain(name="cart", read_models=(DocumentReadModel(RULES),), routes=router)
