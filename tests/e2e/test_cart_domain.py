"""A second domain through the real services: the cart (tests/domains/cart), loaded by
`CQRS_DOMAINS` beside the ledger, both services as processes: its commands, events, read model,
route and rebuild."""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import httpx
import pytest

from shared import topology
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount
from tests.domains.cart.contracts import AddItem, RemoveItem
from tests.e2e.conftest import Pair, stop
from tests.e2e.test_cli import cqrs
from tests.metrics_support import scrape, value

pytestmark = pytest.mark.e2e


DOMAINS = {"CQRS_DOMAINS": "ledger,tests.domains.cart"}


@pytest.fixture
def pair_env() -> dict[str, str]:
    return {
        **DOMAINS,
        # The broker's guest sends as a client login: each domain's policy is asked.
        "CQRS_AUTHORIZATION": "on",
        # A rebuild replays in pages of two events, so a page holds an item added and removed.
        "CQRS_REBUILD_BATCH_SIZE": "2",
        "CQRS_REBUILD_RETIRE_SECONDS": "0",
    }


async def test_a_second_domain_runs_beside_the_ledger(pair: Pair) -> None:
    cart, account = uuid.uuid4(), uuid.uuid4()
    async with (
        await aio_pika.connect(pair.amqp_url) as connection,
        await CommandClient.connect(pair.amqp_url) as client,
        httpx.AsyncClient() as http,
    ):
        # Bound before the first command: every event of the cart arrives here.
        events = await (await connection.channel()).declare_queue(exclusive=True)
        await events.bind(topology.EVENTS_EXCHANGE, routing_key="cart.#")
        added = await client.send_command(
            AddItem(sku="SHOE-42", quantity=2, unit_price=4_999), cart
        )
        hats = await client.send_command(AddItem(sku="HAT-1", quantity=1, unit_price=1_500), cart)
        repriced = await client.send_command(
            AddItem(sku="SHOE-42", quantity=1, unit_price=3_999), cart
        )
        removed = await client.send_command(RemoveItem(sku="HAT-1"), cart)
        missing = await client.send_command(RemoveItem(sku="SOCK-7"), cart)
        # After the refusals, so that its event arriving shows theirs would have by then.
        sentinel = await client.send_command(
            AddItem(sku="SOCK-7", quantity=3, unit_price=299), cart
        )
        opened = await client.send_command(
            OpenAccount(owner_id="guest", currency="EUR", initial_deposit=1_000), account
        )
        deposited = await client.send_command(DepositMoney(amount=250), account)
        not_mine = await client.send_command(
            OpenAccount(owner_id="alice", currency="EUR"), uuid.uuid4()
        )

        assert [(r.status, r.version) for r in (added, hats, removed, sentinel)] == [
            ("accepted", 2),
            ("accepted", 3),
            ("accepted", 4),
            ("accepted", 5),
        ]
        assert [(r.status, r.error and r.error.code) for r in (repriced, missing)] == [
            ("rejected", "price_changed"),
            ("rejected", "item_not_in_cart"),
        ]
        assert (opened.status, deposited.status, deposited.version) == ("accepted", "accepted", 3)
        assert (not_mine.status, not_mine.error and not_mine.error.code) == (
            "rejected",
            "forbidden",
        )

        # Published: the cart's events and nothing for its refused commands.
        published: list[tuple[str, int]] = []
        async with asyncio.timeout(20), events.iterator() as messages:
            async for message in messages:
                body = json.loads(message.body)
                published.append((message.routing_key or "", body["version"]))
                await message.ack()
                if body["version"] == sentinel.version:
                    break
        assert published == [
            ("cart.CartOpened", 1),
            ("cart.ItemAdded", 2),
            ("cart.ItemAdded", 3),
            ("cart.ItemRemoved", 4),
            ("cart.ItemAdded", 5),
        ]

        # Projected and served, reading its own write.
        response = await http.get(
            f"{pair.api}/carts/{cart}", params={"min_version": sentinel.version}
        )
        account_view = await http.get(
            f"{pair.api}/accounts/{account}", params={"min_version": deposited.version}
        )
        unknown = await http.get(f"{pair.api}/carts/{uuid.uuid4()}")
        openapi = (await http.get(f"{pair.api}/openapi.json")).json()

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["items"] == [
        {"sku": "SHOE-42", "quantity": 2, "unit_price": 4_999, "amount": 9_998},
        {"sku": "SOCK-7", "quantity": 3, "unit_price": 299, "amount": 897},
    ]
    assert (body["total_quantity"], body["total_amount"]) == (5, 10_895)
    assert (body["id"], body["version"], body["last_position"]) == (
        str(cart),
        5,
        sentinel.position,
    )
    assert unknown.status_code == 404
    assert account_view.status_code == 200
    assert (account_view.json()["balance"], account_view.json()["owner_id"]) == (1_250, "guest")
    assert "/carts/{cart_id}" in openapi["paths"] and "/accounts/{account_id}" in openapi["paths"]

    async with httpx.AsyncClient(base_url=pair.api) as http:
        # Its read model rebuilds from the event store like the ledger's, and ends the same.
        started = await http.post("/admin/rebuilds", json={"read_models": ["carts"]})
        assert started.status_code == 202, started.text
        async with asyncio.timeout(30):
            while True:
                status = (await http.get("/admin/read-models/carts")).json()
                if (status["rebuild"] or {}).get("state") == "failed":
                    raise AssertionError(status)
                if status["current"] == 2:
                    break
                await asyncio.sleep(0.2)
        rebuilt = await http.get(f"/carts/{cart}")
    assert rebuilt.json() == body

    async with httpx.AsyncClient() as http:
        commands = await scrape(http, f"{pair.command_http}/metrics")
        projected = await scrape(http, f"{pair.api}/metrics")
        ready = await http.get(f"{pair.api}/readyz")
    assert value(commands, "cqrs_commands_total", type="AddItem", outcome="accepted") == 3
    assert value(commands, "cqrs_commands_total", type="AddItem", outcome="rejected") == 1
    assert value(projected, "cqrs_events_projected_total", event_type="ItemRemoved") == 1
    assert ready.status_code == 200, ready.text

    assert dict(stop(pair)) == {"command_service": 0, "query_service": 0}


async def test_the_cqrs_tool_sends_reads_and_rebuilds_the_cart(pair: Pair) -> None:
    # The tool learns the cart's commands from CQRS_DOMAINS, its route from the API's OpenAPI
    # document and its read model from the query service: nothing of the cart is in the tool.
    help_text = await cqrs(pair, "send", "--help", env=DOMAINS)
    assert "AddItem" in help_text.stdout and "RemoveItem" in help_text.stdout
    added = await cqrs(
        pair, "send", "AddItem", "sku=SHOE-42", "quantity=2", "unit_price=4999", "--json",
        env=DOMAINS,
    )  # fmt: skip
    assert added.code == 0, added.stderr
    cart = added.json()["aggregate_id"]
    more = await cqrs(
        pair, "send", "AddItem", "--id", cart, "sku=HAT-1", "quantity=1", "unit_price=1500",
        "--json", env=DOMAINS,
    )  # fmt: skip
    refused = await cqrs(pair, "send", "RemoveItem", "--id", cart, "sku=SOCK-7", env=DOMAINS)
    assert (more.code, more.json()["version"]) == (0, 3)
    assert refused.code == 1 and "item_not_in_cart" in refused.stdout

    routes = await cqrs(pair, "get")
    got = await cqrs(pair, "get", "cart", cart, "min_version=3", "--json")
    pretty = await cqrs(pair, "get", "cart", cart)
    assert routes.code == 0 and "/carts/{cart_id}" in routes.stdout
    assert got.code == 0, got.stderr
    body = got.json()
    assert [(i["sku"], i["quantity"]) for i in body["items"]] == [("HAT-1", 1), ("SHOE-42", 2)]
    assert (body["total_amount"], body["version"]) == (11_498, 3)
    assert pretty.code == 0 and "items (2)" in pretty.stdout

    listed = await cqrs(pair, "rebuild")
    rebuilt = await cqrs(pair, "rebuild", "carts", "--json")
    assert listed.code == 1 and "carts" in listed.stderr  # names the read models it has
    assert rebuilt.code == 0, rebuilt.stdout + rebuilt.stderr
    after = await cqrs(pair, "get", "cart", cart, "--json")
    assert after.json() == body

    assert dict(stop(pair)) == {"command_service": 0, "query_service": 0}
