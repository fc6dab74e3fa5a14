"""The cart's public contract: command payloads and event data.

A cart holds lines, one per SKU, each with a quantity and a unit price in minor units. The
first `AddItem` of a cart opens it (`CartOpened`, then `ItemAdded`); `RemoveItem` takes the
whole line out, and its event says what left, so that a reader needs nothing else to follow.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from shared.contracts import DomainContracts
from shared.messages import Command, Event

CART = "cart"

MAX_QUANTITY = 1_000  # per line
MAX_LINES = 50
MAX_UNIT_PRICE = 10**9

# A SKU is also a field name in the read model (`items.<sku>`): no dot, no leading `$`.
Sku = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9-]{0,31}$")]
Quantity = Annotated[int, Field(strict=True, gt=0, le=MAX_QUANTITY)]
UnitPrice = Annotated[int, Field(strict=True, gt=0, le=MAX_UNIT_PRICE)]


class AddItem(Command):
    """Put `quantity` of `sku` in the cart, at `unit_price` (the same as the line's, if any)."""

    aggregate_type = CART
    sku: Sku
    quantity: Quantity
    unit_price: UnitPrice


class RemoveItem(Command):
    """Take the line of `sku` out of the cart."""

    aggregate_type = CART
    sku: Sku


class CartOpened(Event):
    pass


class ItemAdded(Event):
    sku: str
    quantity: int
    unit_price: int


class ItemRemoved(Event):
    """The whole line left: its quantity and unit price as they were."""

    sku: str
    quantity: int
    unit_price: int


COMMANDS: tuple[type[Command], ...] = (AddItem, RemoveItem)
EVENTS: tuple[type[Event], ...] = (CartOpened, ItemAdded, ItemRemoved)

# What clients (the `cqrs` tool) learn of the cart from `CQRS_DOMAINS`.
contracts = DomainContracts(name="cart", commands=COMMANDS, events=EVENTS)
