"""The cart domain offline: its rules as given/when/then scenarios, who may send its commands,
its read model and route over the in-memory store."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest

from command_service.domains import ledger
from command_service.domains.ledger.account import Account
from command_service.model.authorization import Actor, Forbidden
from command_service.service_layer.access_control import authorization
from command_service.testing import scenario
from query_service.projections.document import DocumentReadModel
from query_service.service_layer.catalog import build_catalog
from query_service.service_layer.projector import Projected, Rejected
from query_service.settings import QueryServiceSettings
from query_service.testing import EventStream, api_client, memory_database, project_events
from shared.contracts import command_types, load_contracts
from shared.ledger import OpenAccount
from tests.domains.cart import command, query
from tests.domains.cart.command import Cart
from tests.domains.cart.contracts import (
    CART,
    MAX_LINES,
    MAX_QUANTITY,
    AddItem,
    CartOpened,
    ItemAdded,
    ItemRemoved,
    RemoveItem,
)

SHOES = ItemAdded(sku="SHOE-42", quantity=2, unit_price=4_999)


class TestCart:
    def test_the_first_item_opens_the_cart(self) -> None:
        cart = (
            scenario(Cart)
            .when(AddItem(sku="SHOE-42", quantity=2, unit_price=4_999))
            .then(CartOpened(), SHOES)
        )
        assert (cart.version, cart.lines["SHOE-42"].quantity) == (2, 2)

    def test_more_of_an_item_adds_to_its_line(self) -> None:
        cart = (
            scenario(Cart)
            .given(CartOpened(), SHOES)
            .when(AddItem(sku="SHOE-42", quantity=3, unit_price=4_999))
            .then(ItemAdded(sku="SHOE-42", quantity=3, unit_price=4_999))
        )
        assert cart.lines["SHOE-42"].quantity == 5

    def test_rejects_an_item_at_another_price(self) -> None:
        scenario(Cart).given(CartOpened(), SHOES).when(
            AddItem(sku="SHOE-42", quantity=1, unit_price=3_999)
        ).then_rejects("price_changed")

    def test_rejects_a_line_beyond_its_quantity_limit(self) -> None:
        scenario(Cart).given(CartOpened(), SHOES).when(
            AddItem(sku="SHOE-42", quantity=MAX_QUANTITY - 1, unit_price=4_999)
        ).then_rejects("quantity_limit")

    def test_rejects_a_line_beyond_the_cart_limit(self) -> None:
        lines = [ItemAdded(sku=f"SKU-{i}", quantity=1, unit_price=1) for i in range(MAX_LINES)]
        scenario(Cart).given(CartOpened(), *lines).when(
            AddItem(sku="ONE-MORE", quantity=1, unit_price=1)
        ).then_rejects("cart_full")

    def test_removing_an_item_takes_its_whole_line(self) -> None:
        cart = (
            scenario(Cart)
            .given(CartOpened(), SHOES, ItemAdded(sku="SHOE-42", quantity=1, unit_price=4_999))
            .when(RemoveItem(sku="SHOE-42"))
            .then(ItemRemoved(sku="SHOE-42", quantity=3, unit_price=4_999))
        )
        assert cart.lines == {}

    def test_rejects_removing_an_item_not_in_the_cart(self) -> None:
        scenario(Cart).given(CartOpened(), SHOES).when(RemoveItem(sku="HAT-1")).then_rejects(
            "item_not_in_cart"
        )
        scenario(Cart).when(RemoveItem(sku="HAT-1")).then_rejects("item_not_in_cart")

    @pytest.mark.parametrize(
        "payload",
        [
            {"sku": "items.a", "quantity": 1, "unit_price": 1},  # a dot would split a path
            {"sku": "$set", "quantity": 1, "unit_price": 1},
            {"sku": "A", "quantity": 0, "unit_price": 1},
            {"sku": "A", "quantity": "1", "unit_price": 1},
            {"sku": "A", "quantity": 1, "unit_price": -5},
        ],
    )
    def test_the_contract_refuses_what_a_cart_cannot_hold(self, payload: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match="validation error"):
            AddItem.model_validate(payload)


def test_clients_learn_the_carts_commands_from_its_contracts() -> None:
    commands = command_types(load_contracts(["ledger", "tests.domains.cart"]))

    assert commands["AddItem"] is AddItem
    assert (commands["RemoveItem"].aggregate_type, commands["OpenAccount"].aggregate_type) == (
        CART,
        "account",
    )


class TestWhoMaySend:
    async def test_a_client_login_may_fill_a_cart_while_the_ledger_keeps_its_rules(
        self,
    ) -> None:
        authorize = authorization([ledger.domain, command.domain], privileged=["admin"])
        alice = Actor.user("alice")

        async def load(*_: object) -> None:
            return None

        await authorize(alice, AddItem(sku="A", quantity=1, unit_price=1), Cart(uuid4()), load)
        account = Account(uuid4())
        with pytest.raises(Forbidden):
            await authorize(alice, OpenAccount(owner_id="bob", currency="EUR"), account, load)
        with pytest.raises(Forbidden, match="anonymous"):
            await authorize(Actor.anonymous(), RemoveItem(sku="A"), Cart(uuid4()), load)


QUICK = QueryServiceSettings(read_wait_seconds=0.5)


def cart_events() -> tuple[EventStream, list[Any]]:
    cart = EventStream(CART)
    return cart, cart.record(
        CartOpened(),
        SHOES,
        ItemAdded(sku="HAT-1", quantity=1, unit_price=1_500),
        ItemAdded(sku="SHOE-42", quantity=1, unit_price=4_999),
        ItemRemoved(sku="HAT-1", quantity=1, unit_price=1_500),
    )


class TestReadSide:
    async def test_the_route_serves_lines_and_totals_and_reads_its_writes(self) -> None:
        catalog = build_catalog(memory_database(), query.domain.read_models)
        cart, events = cart_events()
        await project_events(catalog, *events[:4])

        async with api_client([query.domain], catalog, settings=QUICK) as http:
            unknown = await http.get(f"/carts/{uuid4()}")
            before = await http.get(f"/carts/{cart.aggregate_id}")
            behind = await http.get(f"/carts/{cart.aggregate_id}", params={"min_version": 5})
            await project_events(catalog, events[4])
            after = await http.get(f"/carts/{cart.aggregate_id}", params={"min_version": 5})

        assert unknown.status_code == 404
        assert [(i["sku"], i["quantity"]) for i in before.json()["items"]] == [
            ("HAT-1", 1),
            ("SHOE-42", 3),
        ]
        assert behind.status_code == 504
        assert after.status_code == 200
        body = after.json()
        assert body["items"] == [
            {"sku": "SHOE-42", "quantity": 3, "unit_price": 4_999, "amount": 14_997}
        ]
        assert (body["total_quantity"], body["total_amount"]) == (3, 14_997)
        assert (body["id"], body["version"], body["last_position"]) == (
            str(cart.aggregate_id),
            5,
            events[4].position,
        )

    async def test_a_redelivered_event_changes_nothing(self) -> None:
        catalog = build_catalog(memory_database(), query.domain.read_models)
        cart, events = cart_events()

        outcomes = await project_events(catalog, *events, events[1], events[4])

        assert outcomes[-2:] == [Projected(applied=(), duplicates=(query.NAME,))] * 2
        found = await (await catalog.collection(query.NAME)).find_one(
            {"_id": str(cart.aggregate_id)}
        )
        assert found is not None
        assert (found["total_quantity"], found["items"], found["version"]) == (
            3,
            {"SHOE-42": {"unit_price": 4_999, "quantity": 3}},
            5,
        )

    async def test_an_event_ahead_of_a_missing_one_is_not_applied(self) -> None:
        catalog = build_catalog(memory_database(), query.domain.read_models)
        _, events = cart_events()

        outcomes = await project_events(catalog, events[0], events[2])

        assert isinstance(outcomes[1], Rejected)
        assert "version gap" in outcomes[1].reason

    async def test_a_rebuild_batch_ends_where_the_events_one_by_one_do(self) -> None:
        database = memory_database()
        model = DocumentReadModel(query.RULES)
        carts = [cart_events() for _ in range(3)]
        everything = sorted((e for _, events in carts for e in events), key=lambda e: e.position)
        one_by_one = model.bind({query.NAME: database["one_v1"]})
        for envelope in everything:
            await one_by_one.apply(envelope)
        batched = model.bind({query.NAME: database["batch_v1"]})

        # A replay in pages: the second updates the carts the first created, an item leaving
        # (`$unset`) after the same item's line was touched.
        await batched.apply_batch(everything[:6])
        await batched.apply_batch(everything[6:])

        assert await database["batch_v1"].find({}).sort("_id", 1).to_list() == (
            await database["one_v1"].find({}).sort("_id", 1).to_list()
        )
