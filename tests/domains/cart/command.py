"""The cart as the command service runs it: the aggregate and who may send its commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from command_service.model.aggregate import Aggregate, DomainError
from command_service.model.authorization import Actor, AggregateLoader
from command_service.model.domain import CommandDomain
from shared.messages import Command, Event
from tests.domains.cart.contracts import (
    CART,
    COMMANDS,
    EVENTS,
    MAX_LINES,
    MAX_QUANTITY,
    AddItem,
    CartOpened,
    ItemAdded,
    ItemRemoved,
    RemoveItem,
)


@dataclass(frozen=True)
class Line:
    quantity: int
    unit_price: int


class Cart(Aggregate):
    """A shopping cart: lines of SKUs, at most `MAX_LINES`, each of at most `MAX_QUANTITY`
    at one unit price."""

    aggregate_type = CART
    commands = COMMANDS
    events = EVENTS

    def __init__(self, aggregate_id: UUID) -> None:
        super().__init__(aggregate_id)
        self.opened = False
        self.lines: dict[str, Line] = {}

    def apply(self, event: Event) -> None:
        match event:
            case CartOpened():
                self.opened = True
            case ItemAdded(sku=sku, quantity=quantity, unit_price=unit_price):
                held = self.lines.get(sku, Line(0, unit_price)).quantity
                self.lines[sku] = Line(held + quantity, unit_price)
            case ItemRemoved(sku=sku):
                del self.lines[sku]

    def decide(self, command: Command) -> Sequence[Event]:
        match command:
            case AddItem(sku=sku, quantity=quantity, unit_price=unit_price):
                line = self.lines.get(sku)
                if line is not None and line.unit_price != unit_price:
                    raise DomainError(
                        "price_changed",
                        f"{sku} is in the cart at {line.unit_price}, not {unit_price}",
                    )
                if line is None and len(self.lines) >= MAX_LINES:
                    raise DomainError("cart_full", f"a cart holds at most {MAX_LINES} lines")
                if (line.quantity if line else 0) + quantity > MAX_QUANTITY:
                    raise DomainError(
                        "quantity_limit", f"a line holds at most {MAX_QUANTITY} of its SKU"
                    )
                added = ItemAdded(sku=sku, quantity=quantity, unit_price=unit_price)
                return [added] if self.opened else [CartOpened(), added]
            case RemoveItem(sku=sku):
                line = self.lines.get(sku)
                if line is None:
                    raise DomainError("item_not_in_cart", f"{sku} is not in cart {self.id}")
                return [ItemRemoved(sku=sku, quantity=line.quantity, unit_price=line.unit_price)]
        raise DomainError("unknown_command", f"a cart does not take {command.type_name()}")


async def shoppers_policy(
    actor: Actor, command: Command, aggregate: Aggregate, load: AggregateLoader
) -> None:
    """Any client login may fill and empty carts (with authorization on, a domain without a
    policy is open to privileged logins only)."""


domain = CommandDomain(name="cart", aggregates=(Cart,), policy=shoppers_policy)
