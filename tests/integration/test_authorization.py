"""Who may do what, against the real broker: two client logins, alice and bob, and an admin.

The sender's identity is the AMQP `user_id` property, which RabbitMQ checks against the
connection's login; the ledger's policy lets a client act only on the accounts it owns, and the
privileged logins (`CQRS_PRIVILEGED_USERS`) act on any. Every stored event names who acted.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import asyncpg
import pytest

from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.bootstrap import CommandService, start
from command_service.domains import ledger
from command_service.domains.ledger.account import Account
from command_service.domains.ledger.transfer import Transfer
from command_service.service_layer.registry import CommandRegistry
from command_service.settings import CommandServiceSettings
from cqrs_cli.dlq_command import list_dead_letters, replay_dead_letters
from shared import topology
from shared.client import BrokerRefusedError, CommandClient, envelope_for
from shared.ledger import (
    CloseAccount,
    DepositMoney,
    FreezeAccount,
    OpenAccount,
    RequestTransfer,
    UnfreezeAccount,
    WithdrawMoney,
)
from shared.messages import Command, CommandEnvelope, CommandMetadata, Reply

pytestmark = pytest.mark.integration

DEFINITIONS = Path(__file__).parents[2] / "scripts" / "docker" / "rabbitmq" / "definitions.json"


@dataclass(frozen=True)
class Login:
    name: str
    url: str


async def _rabbitmqctl(*args: str) -> None:
    run = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await run.communicate()
    assert run.returncode == 0, f"rabbitmqctl {args[0]}: {err.decode()}"


@pytest.fixture
async def logins(broker: str) -> AsyncIterator[dict[str, Login]]:
    """Fresh broker users alice, bob and admin with the client role's permissions
    (scripts/docker/rabbitmq/definitions.json) on the test vhost."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("this test creates broker users with rabbitmqctl, which is not on PATH")
    parts = urlsplit(broker)
    vhost = unquote(parts.path.lstrip("/")) or "/"
    (client,) = [
        p for p in json.loads(DEFINITIONS.read_text())["permissions"] if p["user"] == "cqrs-client"
    ]
    tag = uuid.uuid4().hex[:6]
    found: dict[str, Login] = {}
    try:
        for role in ("alice", "bob", "admin"):
            name, password = f"{role}-{tag}", secrets.token_hex(12)
            await _rabbitmqctl("add_user", name, password)
            found[role] = Login(name, "")  # created: deleted at the end even if the next fails
            await _rabbitmqctl(
                "set_permissions",
                "-p",
                vhost,
                name,
                client["configure"],
                client["write"],
                client["read"],
            )
            netloc = f"{quote(name, safe='')}:{password}@{parts.hostname}:{parts.port}"
            found[role] = Login(name, parts._replace(netloc=netloc).geturl())
        yield found
    finally:
        for login in found.values():
            await _rabbitmqctl("delete_user", login.name)


@pytest.fixture
async def guarded(
    command_settings: CommandServiceSettings, logins: dict[str, Login]
) -> AsyncIterator[CommandService]:
    """The command service with the ledger's owner policy, `admin` privileged."""
    service = await start(
        command_settings.model_copy(
            update={"authorization": "on", "privileged_users": logins["admin"].name}
        )
    )
    yield service
    await service.stop()


@pytest.fixture
async def clients(
    guarded: CommandService, logins: dict[str, Login]
) -> AsyncIterator[dict[str, CommandClient]]:
    opened: dict[str, CommandClient] = {}
    try:
        for role, login in logins.items():
            opened[role] = await CommandClient.connect(login.url)
        yield opened
    finally:
        for client in opened.values():
            await client.close()


async def stream(pg_dsn: str, stream_id: uuid.UUID) -> list[tuple[str, str | None]]:
    """(event type, metadata.user) of each event of a stream, in version order."""
    connection = await asyncpg.connect(pg_dsn)
    try:
        rows = await connection.fetch(
            "SELECT type, metadata->>'user' AS user FROM events WHERE stream_id = $1 "
            "ORDER BY version",
            stream_id,
        )
    finally:
        await connection.close()
    return [(row["type"], row["user"]) for row in rows]


async def balance(pool: asyncpg.Pool, account: uuid.UUID) -> int:
    registry = CommandRegistry.from_domains([ledger.domain])
    history = await PostgresEventStore(pool).load_stream(account)
    events = [registry.event_from_stored(e.type, e.schema_version, e.data) for e in history]
    return Account.rehydrate(account, events).balance


def code(reply: Reply) -> str | None:
    return reply.error.code if reply.error else None


async def open_for(client: CommandClient, owner: str, deposit: int = 100) -> uuid.UUID:
    account = uuid.uuid4()
    reply = await client.send_command(
        OpenAccount(owner_id=owner, currency="EUR", initial_deposit=deposit), account
    )
    assert reply.status == "accepted", reply
    return account


async def test_a_client_acts_on_its_own_account_and_events_name_it(
    clients: dict[str, CommandClient], logins: dict[str, Login], pg_dsn: str, pool: asyncpg.Pool
) -> None:
    alice = logins["alice"].name
    account = await open_for(clients["alice"], alice)
    reply = await clients["alice"].send_command(DepositMoney(amount=25), account)
    assert (reply.status, reply.version) == ("accepted", 3)
    assert await stream(pg_dsn, account) == [
        ("AccountOpened", alice),
        ("MoneyDeposited", alice),
        ("MoneyDeposited", alice),
    ]
    assert await balance(pool, account) == 125


@pytest.mark.parametrize(
    "command",
    [
        WithdrawMoney(amount=10),
        DepositMoney(amount=10),
        FreezeAccount(),
        UnfreezeAccount(),
        CloseAccount(),
    ],
    ids=lambda c: c.type_name(),
)
async def test_another_client_may_not_act_on_the_account(
    command: Command,
    clients: dict[str, CommandClient],
    logins: dict[str, Login],
    pg_dsn: str,
    pool: asyncpg.Pool,
) -> None:
    account = await open_for(clients["alice"], logins["alice"].name)
    before = await stream(pg_dsn, account)
    envelope = envelope_for(command, account)
    reply = await clients["bob"].send(envelope, command.aggregate_type)
    assert (reply.status, code(reply)) == ("rejected", "forbidden")
    # Stored like any rejection: a resend is answered with it, as a duplicate.
    again = await clients["bob"].send(envelope, command.aggregate_type)
    assert (again.status, again.error) == ("duplicate", reply.error)
    # Nothing appended (checked after the resend, which came through the same partition).
    assert await stream(pg_dsn, account) == before
    assert await balance(pool, account) == 100


async def test_a_client_may_not_transfer_out_of_another_clients_account(
    clients: dict[str, CommandClient], logins: dict[str, Login], pg_dsn: str, pool: asyncpg.Pool
) -> None:
    victim = await open_for(clients["alice"], logins["alice"].name)
    thief = await open_for(clients["bob"], logins["bob"].name, deposit=0)
    transfer = uuid.uuid4()
    reply = await clients["bob"].send_command(
        RequestTransfer(from_account_id=victim, to_account_id=thief, amount=60), transfer
    )
    assert (reply.status, code(reply)) == ("rejected", "forbidden")
    # Out of an account that does not exist either: it is nobody's to spend.
    nowhere = await clients["bob"].send_command(
        RequestTransfer(from_account_id=uuid.uuid4(), to_account_id=thief, amount=1), uuid.uuid4()
    )
    assert code(nowhere) == "forbidden"
    # A sentinel through the same partition as the refused transfer, then the process
    # manager's work is visible: alice's own transfer moves money and names its actors.
    mine = uuid.uuid4()
    reply = await clients["alice"].send_command(
        RequestTransfer(from_account_id=victim, to_account_id=thief, amount=30), mine
    )
    assert reply.status == "accepted"
    store = PostgresEventStore(pool)
    registry = CommandRegistry.from_domains([ledger.domain])
    async with asyncio.timeout(15):
        while True:
            history = await store.load_stream(mine)
            events = [registry.event_from_stored(e.type, e.schema_version, e.data) for e in history]
            if Transfer.rehydrate(mine, events).status == "completed":
                break
            await asyncio.sleep(0.05)
    assert await stream(pg_dsn, transfer) == []
    assert (await balance(pool, victim), await balance(pool, thief)) == (70, 30)
    alice, steps = logins["alice"].name, "process:transfers"
    assert await stream(pg_dsn, mine) == [
        ("TransferRequested", alice),
        ("TransferCompleted", steps),
    ]
    assert await stream(pg_dsn, victim) == [
        ("AccountOpened", alice),
        ("MoneyDeposited", alice),
        ("MoneyDebitedForTransfer", steps),
        ("TransferDebitSettled", steps),
    ]


async def test_a_client_opens_accounts_only_for_itself(
    clients: dict[str, CommandClient], logins: dict[str, Login], pg_dsn: str
) -> None:
    account = uuid.uuid4()
    reply = await clients["bob"].send_command(
        OpenAccount(owner_id=logins["alice"].name, currency="EUR"), account
    )
    assert (reply.status, code(reply)) == ("rejected", "forbidden")
    assert await stream(pg_dsn, account) == []
    # On an account that does not exist, other commands answer as without a policy.
    missing = await clients["bob"].send_command(WithdrawMoney(amount=1), account)
    assert code(missing) == "account_not_found"
    await open_for(clients["bob"], logins["bob"].name)


async def test_a_privileged_login_acts_on_any_account(
    clients: dict[str, CommandClient], logins: dict[str, Login], pg_dsn: str, pool: asyncpg.Pool
) -> None:
    alice, admin = logins["alice"].name, logins["admin"].name
    account = await open_for(clients["alice"], alice)
    for command in (WithdrawMoney(amount=40), FreezeAccount()):
        reply = await clients["admin"].send_command(command, account)
        assert reply.status == "accepted", reply
    # Opening an account for someone else, too.
    theirs = await open_for(clients["admin"], alice, deposit=0)
    assert await stream(pg_dsn, account) == [
        ("AccountOpened", alice),
        ("MoneyDeposited", alice),
        ("MoneyWithdrawn", admin),
        ("AccountFrozen", admin),
    ]
    assert await stream(pg_dsn, theirs) == [("AccountOpened", admin)]
    assert await balance(pool, account) == 60


async def test_what_the_envelope_claims_is_not_who_sent_it(
    clients: dict[str, CommandClient], logins: dict[str, Login], pg_dsn: str
) -> None:
    alice, bob = logins["alice"].name, logins["bob"].name
    victim = await open_for(clients["alice"], alice)
    own = await open_for(clients["bob"], bob)
    claims = CommandMetadata(user=alice)
    refused = envelope_for(WithdrawMoney(amount=10), victim).model_copy(update={"metadata": claims})
    reply = await clients["bob"].send(refused, "account")
    assert code(reply) == "forbidden"
    accepted = envelope_for(DepositMoney(amount=10), own).model_copy(update={"metadata": claims})
    assert (await clients["bob"].send(accepted, "account")).status == "accepted"
    assert (await stream(pg_dsn, own))[-1] == ("MoneyDeposited", bob)


async def test_the_broker_refuses_a_user_id_that_is_not_the_login(
    clients: dict[str, CommandClient], logins: dict[str, Login], pg_dsn: str, pool: asyncpg.Pool
) -> None:
    alice = logins["alice"].name
    account = await open_for(clients["alice"], alice)
    # The SDK, told to claim another login, gets the broker's refusal as its own error.
    async with await CommandClient.connect(logins["bob"].url, user_id=alice) as impostor:
        with pytest.raises(BrokerRefusedError):
            await impostor.send_command(WithdrawMoney(amount=50), account, timeout=5)
    # So does any AMQP client: the channel is closed, the message never queued.
    connection = await aio_pika.connect(logins["bob"].url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
        envelope = envelope_for(WithdrawMoney(amount=50), account)
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await exchange.publish(
                aio_pika.Message(
                    envelope.model_dump_json().encode(),
                    content_type="application/json",
                    message_id=str(envelope.command_id),
                    user_id=alice,
                    headers={topology.AGGREGATE_ID_HEADER: str(account)},
                ),
                routing_key=topology.routing_key("account", "WithdrawMoney"),
            )
    # A sentinel on the same aggregate (so the same partition) follows both attempts.
    reply = await clients["alice"].send_command(DepositMoney(amount=1), account)
    assert (reply.status, reply.version) == ("accepted", 3)
    assert await balance(pool, account) == 101
    assert [user for _, user in await stream(pg_dsn, account)] == [alice] * 3


async def _send_raw(
    url: str,
    envelope: Any,
    routing_key: str,
    *,
    user_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> Reply:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(
            f"{topology.REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}", exclusive=True
        )
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                envelope.model_dump_json().encode(),
                content_type="application/json",
                message_id=str(envelope.command_id),
                reply_to=replies.name,
                correlation_id=str(envelope.command_id),
                user_id=user_id,
                headers={
                    topology.AGGREGATE_ID_HEADER: str(envelope.aggregate_id),
                    **(headers or {}),
                },
            ),
            routing_key=routing_key,
        )
        async with asyncio.timeout(10), replies.iterator() as messages:
            async for message in messages:
                await message.ack()
                return Reply.model_validate_json(message.body)
    raise AssertionError("no reply")


async def test_an_anonymous_command_is_refused(
    clients: dict[str, CommandClient], logins: dict[str, Login], pg_dsn: str
) -> None:
    alice = logins["alice"].name
    account = await open_for(clients["alice"], alice)
    # Published without user_id: the broker checks nothing, so the sender is nobody.
    anonymous = envelope_for(DepositMoney(amount=5), account)
    reply = await _send_raw(logins["alice"].url, anonymous, "account.DepositMoney")
    assert code(reply) == "forbidden"
    # The same with the property set to the login is alice's, and allowed.
    signed = envelope_for(DepositMoney(amount=5), account)
    reply = await _send_raw(logins["alice"].url, signed, "account.DepositMoney", user_id=alice)
    assert reply.status == "accepted"
    assert [user for _, user in await stream(pg_dsn, account)] == [alice] * 3


async def test_a_dead_letter_names_its_sender_and_a_replay_acts_as_the_replaying_login(
    clients: dict[str, CommandClient], logins: dict[str, Login], broker: str, pg_dsn: str
) -> None:
    alice = logins["alice"].name
    account = await open_for(clients["alice"], alice)
    forged = {topology.SENDER_HEADER: logins["admin"].name}
    bad = CommandEnvelope(type="DepositMoney", aggregate_id=account, payload={"amount": "x"})
    for user_id in (alice, None):
        reply = await _send_raw(
            logins["alice"].url, bad, "account.DepositMoney", user_id=user_id, headers=forged
        )
        assert code(reply) == "invalid_payload"
    # Replied after the dead letter was confirmed: both are there. The sender is the verified
    # login, whatever header the sender wrote (none for the anonymous one).
    _, letters = await list_dead_letters(broker, limit=10)
    assert [letter.sender for letter in letters] == [alice, None]

    # A dead letter of alice's (one a since-fixed service could not handle) replayed by
    # another login is that login's command: here the broker's guest, not privileged.
    deposit = envelope_for(DepositMoney(amount=7), account)
    connection = await aio_pika.connect(broker)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await channel.get_exchange(topology.COMMAND_DEAD_LETTER_EXCHANGE)
        await dead.publish(
            aio_pika.Message(
                deposit.model_dump_json().encode(),
                content_type="application/json",
                message_id=str(deposit.command_id),
                headers={
                    topology.AGGREGATE_ID_HEADER: str(account),
                    topology.REASON_HEADER: "internal_error: since fixed",
                    topology.SENDER_HEADER: alice,
                    "x-original-routing-key": "account.DepositMoney",
                },
            ),
            routing_key="",
        )
    result = await replay_dead_letters(broker, command_ids={str(deposit.command_id)})
    assert result.replayed == [str(deposit.command_id)]
    stored = await asyncpg.connect(pg_dsn)
    try:
        async with asyncio.timeout(10):
            while (
                answer := await stored.fetchval(
                    "SELECT reply FROM commands WHERE command_id = $1", deposit.command_id
                )
            ) is None:
                await asyncio.sleep(0.05)
    finally:
        await stored.close()
    assert code(Reply.model_validate(json.loads(answer))) == "forbidden"
    assert [user for _, user in await stream(pg_dsn, account)] == [alice, alice]


async def test_a_login_that_cannot_travel_is_dead_lettered_not_stored(
    guarded: CommandService, broker: str, pg_dsn: str
) -> None:
    """RabbitMQ takes logins that are no identifier (a space here); the name could not be
    stored or logged as it is, so such a sender's command is refused at the edge."""
    parts = urlsplit(broker)
    vhost = unquote(parts.path.lstrip("/")) or "/"
    name, password = f"odd login {uuid.uuid4().hex[:6]}", secrets.token_hex(12)
    await _rabbitmqctl("add_user", name, password)
    try:
        await _rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        netloc = f"{quote(name, safe='')}:{password}@{parts.hostname}:{parts.port}"
        async with await CommandClient.connect(parts._replace(netloc=netloc).geturl()) as odd:
            assert odd.user_id == name
            account = uuid.uuid4()
            reply = await odd.send_command(OpenAccount(owner_id="o", currency="EUR"), account)
        assert code(reply) == "invalid_user_id"
        assert await stream(pg_dsn, account) == []
        _, letters = await list_dead_letters(broker, limit=10)
        assert [letter.reason.split(":")[0] for letter in letters] == ["invalid_user_id"]
    finally:
        await _rabbitmqctl("delete_user", name)
