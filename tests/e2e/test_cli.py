"""The `cqrs` tool as a user runs it (the installed script, as a process) against the pair."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from shared import topology
from tests.e2e.conftest import Pair, free_port

pytestmark = pytest.mark.e2e

CQRS = Path(sys.executable).with_name("cqrs")


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture(autouse=True)
def quick_rebuilds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set before the pair starts: a rebuild drops the replaced generation at once."""
    monkeypatch.setenv("CQRS_REBUILD_RETIRE_SECONDS", "0.2")


async def cqrs(
    pair: Pair,
    *args: str,
    command_url: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> Run:
    env = {
        **os.environ,
        **(env or {}),
        "CQRS_AMQP_URL": pair.amqp_url,
        "CQRS_QUERY_URL": pair.api,
        # Nothing listens there unless a test says otherwise.
        "CQRS_COMMAND_URL": command_url or f"http://127.0.0.1:{free_port()}",
        "COLUMNS": "200",
    }
    process = await asyncio.create_subprocess_exec(
        str(CQRS),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def test_send_and_get_round_trip(pair: Pair) -> None:
    opened = await cqrs(
        pair, "send", "OpenAccount", "owner_id=cli-alice", "currency=EUR", "initial_deposit=1000",
        "--json",
    )  # fmt: skip
    assert opened.code == 0, opened.stderr
    reply = opened.json()
    assert reply["status"] == "accepted"
    account = reply["aggregate_id"]

    deposited = await cqrs(pair, "send", "DepositMoney", "--id", account, "amount=250", "--json")
    assert (deposited.code, deposited.json()["version"]) == (0, 3)
    refused = await cqrs(pair, "send", "WithdrawMoney", "--id", account, "amount=99999")
    assert refused.code == 1
    assert "rejected" in refused.stdout and "insufficient_funds" in refused.stdout

    got = await cqrs(pair, "get", "account", account, "min_version=3", "--json")
    assert got.code == 0, got.stderr
    document = got.json()
    assert (document["id"], document["balance"], document["version"]) == (account, 1250, 3)
    assert (document["owner_id"], document["status"]) == ("cli-alice", "open")

    pretty = await cqrs(pair, "get", "account", account)
    assert pretty.code == 0
    assert f"account {account}" in pretty.stdout  # the title: the route and its path value
    assert row(pretty.stdout, "balance") == ["balance", "1250"]
    assert row(pretty.stdout, "currency") == ["currency", "EUR"]
    assert row(pretty.stdout, "owner_id") == ["owner_id", "cli-alice"]

    history = await cqrs(pair, "get", "transactions", account, "min_version=3", "--json")
    assert [item["amount"] for item in history.json()["items"]] == [250, 1000]
    owner = await cqrs(pair, "get", "owner", "cli-alice", "--json")
    assert owner.json()["totals"] == [{"currency": "EUR", "balance": 1250, "accounts": 1}]
    second = await cqrs(pair, "send", "OpenAccount", "owner_id=cli-alice", "currency=EUR", "--json")
    assert second.code == 0, second.stderr
    other = second.json()["aggregate_id"]
    first_page = await cqrs(
        pair, "get", "owner", "cli-alice", "limit=1", f"account_id={other}", "min_version=1",
    )  # fmt: skip
    assert first_page.code == 0, first_page.stderr
    # One account on this page, of the owner's two (the totals count them all).
    assert "accounts (1)" in first_page.stdout and "totals (1)" in first_page.stdout
    assert row(first_page.stdout, "EUR") == ["EUR", "1250", "2"]
    assert min(account, other) in first_page.stdout and max(account, other) not in first_page.stdout
    assert "more: cursor=" in first_page.stdout
    paged = (await cqrs(pair, "get", "owner", "cli-alice", "limit=1", "--json")).json()
    last_page = await cqrs(
        pair, "get", "owner", "cli-alice", "limit=1", f"cursor={paged['next_cursor']}", "--json",
    )  # fmt: skip
    assert [item["id"] for item in last_page.json()["accounts"]] == [max(account, other)]
    assert last_page.json()["next_cursor"] is None
    assert last_page.json()["totals"] == [{"currency": "EUR", "balance": 1250, "accounts": 2}]
    listed = await cqrs(pair, "get", "accounts", "owner_id=cli-alice")
    assert account in listed.stdout and "items (2)" in listed.stdout
    assert "more: cursor=" not in listed.stdout  # the last page

    missing = await cqrs(pair, "get", "account", str(uuid.uuid4()))
    assert missing.code == 1
    assert "account not found" in missing.stderr and missing.stdout == ""
    invalid = await cqrs(pair, "get", "transfer", "not-a-uuid", "--json")
    assert invalid.code == 1 and "422" in invalid.stderr


def row(table: str, first: str) -> list[str]:
    """The cells of the one line of a printed table or panel whose first cell is `first`."""
    found = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip(" │┃|").split("│")]
        cells = [cell for part in cells for cell in part.split("  ") if cell.strip()]
        if cells and cells[0].strip() == first:
            found.append([cell.strip() for cell in cells])
    assert len(found) == 1, (first, table)
    return found[0]


CART_CONTRACTS = """
from shared.contracts import DomainContracts
from shared.messages import Command


class AddItem(Command):
    aggregate_type = "cart"
    sku: str
    quantity: int


contracts = DomainContracts(name="cart", commands=(AddItem,))
"""


async def test_routes_and_commands_come_from_the_domains(pair: Pair, tmp_path: Path) -> None:
    listed = await cqrs(pair, "get", "--json")
    assert listed.code == 0, listed.stderr
    routes = {route["name"]: route for route in listed.json()}
    assert {"account", "accounts", "transactions", "owner", "transfer"} <= set(routes)
    assert routes["transactions"]["path"] == "/accounts/{account_id}/transactions"
    assert routes["transactions"]["path_parameters"] == ["account_id"]
    assert [p["name"] for p in routes["accounts"]["query_parameters"]] == [
        "owner_id", "status", "currency", "limit", "cursor",
    ]  # fmt: skip
    pretty = await cqrs(pair, "get")
    assert pretty.code == 0, pretty.stderr
    owner = row(pretty.stdout, "owner")
    assert owner[1] == "/owners/{owner_id}/summary"
    assert owner[2].startswith("<owner_id> min_version=integer?")

    unknown = await cqrs(pair, "get", "acount", str(uuid.uuid4()))
    assert unknown.code == 1 and "no route 'acount'" in unknown.stderr
    assert "account, accounts, transactions, owner, transfer" in unknown.stderr
    misnamed = await cqrs(pair, "get", "accounts", "owner=cli-carol")
    assert misnamed.code == 1 and "no query parameter 'owner'" in misnamed.stderr
    assert "[owner_id=string]" in misnamed.stderr
    missing = await cqrs(pair, "get", "transfer")
    assert missing.code == 1 and "cqrs get transfer <transfer_id>" in missing.stderr

    # A domain of one's own, configured for the tool alone (this pair runs only the ledger):
    # the tool finds its command type, aggregate type and field types in its contracts.
    package = tmp_path / "acme_cart_e2e" / "cart"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").touch()
    (package / "__init__.py").touch()
    (package / "contracts.py").write_text(CART_CONTRACTS)
    cart = {"PYTHONPATH": str(tmp_path), "CQRS_DOMAINS": "ledger,acme_cart_e2e.cart"}
    helped = await cqrs(pair, "send", "--help", env=cart)
    assert "AddItem (cart): sku, quantity" in helped.stdout and "OpenAccount" in helped.stdout
    sent = await cqrs(pair, "send", "AddItem", "sku=42", "quantity=2", "--json", env=cart)
    assert sent.code == 1, sent.stderr  # the command service here knows no carts
    assert sent.json()["error"]["code"] == "unknown_command_type"
    dead = (await cqrs(pair, "dlq", "list", "--json")).json()["messages"]
    assert [m["routing_key"] for m in dead] == ["cart.AddItem"]
    assert '"payload":{"sku":"42","quantity":2}' in dead[0]["body"]
    refused = await cqrs(pair, "send", "AddItem", "sku=42")  # the ledger alone
    assert refused.code == 1 and "unknown command type 'AddItem'" in refused.stderr
    assert "DepositMoney (account): amount, currency?" in refused.stderr


class FakeCommandStatus(BaseHTTPRequestHandler):
    """The command service's `GET /status`, as its contract describes it."""

    body = {
        "service": "command",
        "replica": "host-1234",
        "members": 2,
        "partitions_owned": [0, 1],
        "relay": {"published_position": 40, "head_position": 42, "backlog": 2},
        "handled": 17,
        "tasks": ["cqrs.commands.p0", "relay"],
        "failing_tasks": [{"task": "relay", "reason": "publish_failed", "failures": 4}],
    }

    def do_GET(self) -> None:
        payload = json.dumps(self.body).encode()
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def command_status() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCommandStatus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_status_shows_queues_consumers_and_the_relay(pair: Pair, command_status: str) -> None:
    shown = await cqrs(pair, "status", "--json")
    assert shown.code == 0, shown.stderr
    state = shown.json()
    commands = state["broker"]["command_partitions"]
    assert [q["name"] for q in commands] == [topology.command_partition_queue(i) for i in range(4)]
    assert all(q["consumers"] == 1 for q in commands)
    projector = state["broker"]["projector_partitions"]
    assert [q["name"] for q in projector] == [
        topology.projector_partition_queue(i) for i in range(4)
    ]
    assert state["broker"]["dead_letters"]["name"] == topology.COMMAND_DEAD_LETTER_QUEUE
    assert state["broker"]["parked"]["messages"] == 0
    assert state["query_service"]["status"] == "ready"
    assert state["lag"]["events"] == 0
    assert state["command_service"]["ok"] is False  # nothing listens: shown, not a crash

    pretty = await cqrs(pair, "status")
    assert pretty.code == 0, pretty.stderr
    for index in range(4):
        assert topology.command_partition_queue(index) in pretty.stdout
    assert "unavailable" in pretty.stdout and "ready" in pretty.stdout

    relayed = await cqrs(pair, "status", "--json", "--partitions", "2", command_url=command_status)
    state = relayed.json()
    assert len(state["broker"]["command_partitions"]) == 2
    assert state["command_service"]["relay"]["backlog"] == 2
    assert state["lag"]["relay_backlog"] == 2 and state["lag"]["published_position"] == 40
    pretty = await cqrs(pair, "status", command_url=command_status)
    assert "host-1234" in pretty.stdout and "replicas seen" in pretty.stdout
    # A task that keeps failing is named with its reason code.
    assert "relay (publish_failed, 4 in a row)" in " ".join(pretty.stdout.split())


async def dead_letters_waiting(amqp_url: str, count: int) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        async with asyncio.timeout(20):
            while True:
                queue = await channel.declare_queue(
                    topology.COMMAND_DEAD_LETTER_QUEUE, passive=True
                )
                if queue.declaration_result.message_count == count:
                    return
                await asyncio.sleep(0.1)
    finally:
        await connection.close()


async def test_dead_letters_are_listed_without_loss_and_replayed(pair: Pair) -> None:
    opened = await cqrs(
        pair, "send", "OpenAccount", "owner_id=cli-bob", "currency=EUR", "initial_deposit=100",
        "--json",
    )  # fmt: skip
    account = opened.json()["aggregate_id"]
    fixed_id = str(uuid.uuid4())
    connection = await aio_pika.connect(pair.amqp_url)
    try:
        channel = await connection.channel()
        commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        await commands.publish(aio_pika.Message(b"not json"), routing_key="account.DepositMoney")
        await dead_letters_waiting(pair.amqp_url, 1)
        # A command dead-lettered earlier for a reason since fixed (say, a command type that
        # the service of the day did not know yet): dead letters look like this one.
        dead = await channel.get_exchange(topology.COMMAND_DEAD_LETTER_EXCHANGE)
        envelope = {
            "command_id": fixed_id,
            "type": "DepositMoney",
            "aggregate_id": account,
            "payload": {"amount": 40},
        }
        await dead.publish(
            aio_pika.Message(
                json.dumps(envelope).encode(),
                content_type="application/json",
                message_id=fixed_id,
                type="DepositMoney",
                headers={
                    topology.AGGREGATE_ID_HEADER: account,
                    topology.REASON_HEADER: "unknown_command_type: DepositMoney",
                    "x-original-routing-key": "account.DepositMoney",
                },
            ),
            routing_key="",
        )
    finally:
        await connection.close()
    await dead_letters_waiting(pair.amqp_url, 2)

    for _ in range(2):  # looking twice: listing loses nothing and keeps the order
        listed = await cqrs(pair, "dlq", "list", "--json")
        assert listed.code == 0, listed.stderr
        body = listed.json()
        assert body["waiting"] == 2
        bad, fixed = body["messages"]
        assert bad["reason"].startswith("invalid_envelope")
        assert bad["routing_key"] == "account.DepositMoney"
        assert (fixed["command_id"], fixed["type"]) == (fixed_id, "DepositMoney")
    pretty = await cqrs(pair, "dlq", "list")
    assert "invalid_envelope" in pretty.stdout and fixed_id in pretty.stdout

    unknown = await cqrs(pair, "dlq", "replay", "--id", str(uuid.uuid4()))
    assert unknown.code == 1 and "not found" in unknown.stdout
    replayed = await cqrs(pair, "dlq", "replay", "--id", fixed_id, "--json")
    assert replayed.code == 0, replayed.stderr
    assert replayed.json()["replayed"] == [fixed_id]

    got = await cqrs(pair, "get", "account", account, "min_version=3", "--json")
    assert got.code == 0, got.stderr
    assert (got.json()["balance"], got.json()["version"]) == (140, 3)
    left = (await cqrs(pair, "dlq", "list", "--json")).json()
    assert [m["reason"].split(":")[0] for m in left["messages"]] == ["invalid_envelope"]


async def test_load_then_rebuild_with_progress(pair: Pair) -> None:
    loaded = await cqrs(
        pair, "load", "--rate", "40", "--duration", "2", "--seed", "3", "--json",
        "--mix", "open=1,deposit=5,withdraw=3,transfer=1,invalid=0.1",
    )  # fmt: skip
    assert loaded.code == 0, loaded.stderr
    summary = loaded.json()
    assert summary["sent"] > 40 and summary["accepted"] > 0
    assert summary["sent"] == (
        summary["accepted"] + summary["rejected"] + summary["duplicates"] + summary["timeouts"]
    )
    assert summary["latency_ms"]["p50"] is not None
    assert summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"]

    pretty = await cqrs(pair, "load", "--rate", "20", "--duration", "1")
    assert pretty.code == 0, pretty.stderr
    assert "load summary" in pretty.stdout and "latency p95" in pretty.stdout

    rebuilt = await cqrs(pair, "rebuild", "accounts")
    assert rebuilt.code == 0, rebuilt.stdout + rebuilt.stderr
    assert "events" in rebuilt.stdout and "done" in rebuilt.stdout
    final = await cqrs(pair, "rebuild", "accounts", "--json")
    assert final.code == 0, final.stderr
    (model,) = final.json()["read_models"]
    assert model["rebuild"]["state"] == "done" and model["rebuild"]["events"] > 0
    assert model["current"] == 3  # two rebuilds: generation 1 → 2 → 3
    unknown = await cqrs(pair, "rebuild", "no_such_model")
    assert unknown.code == 1 and "unknown read models" in unknown.stderr
    # The read models are the query service's: none named, they are listed.
    unnamed = await cqrs(pair, "rebuild")
    assert unnamed.code == 1
    assert "accounts, transactions, owner_summaries, transfers" in unnamed.stderr
