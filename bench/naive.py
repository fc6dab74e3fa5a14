"""The naive pipeline: what a team would write in a day, the baseline the project must beat.

Commands, one at a time: consume, one transaction (load the stream, decide, insert the events
and the command record), publish each event with an awaited confirm, reply, ack. A transfer is
one transaction over both accounts. The projector, one event at a time: consume, the writes of
the same four read models as the project's (one per model, the account's guarded), ack. It
keeps the public envelopes, so the same load generator drives it.

    python -m bench.naive commands AMQP_URL POSTGRES_DSN
    python -m bench.naive projector AMQP_URL MONGO_URL DATABASE
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError

from shared.messages import CommandEnvelope, EventEnvelope

COMMANDS_EXCHANGE = "bench.naive.commands"
COMMANDS_QUEUE = "bench.naive.commands"
EVENTS_EXCHANGE = "bench.naive.events"
EVENTS_QUEUE = "bench.naive.events"

SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_events (
    position bigserial PRIMARY KEY,
    stream_id uuid NOT NULL,
    aggregate_type text NOT NULL,
    version integer NOT NULL,
    type text NOT NULL,
    data jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS naive_commands (command_id uuid PRIMARY KEY, reply jsonb NOT NULL);
"""


class Rejected(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Account:
    def __init__(self) -> None:
        self.version = 0
        self.balance = 0
        self.open = False


async def _load(connection: asyncpg.Connection, stream: uuid.UUID) -> Account:
    account = Account()
    for row in await connection.fetch(
        "SELECT type, data FROM naive_events WHERE stream_id = $1 ORDER BY version", stream
    ):
        account.version += 1
        if row["type"] == "AccountOpened":
            account.open = True
        elif row["type"] == "MoneyDeposited":
            account.balance += row["data"]["amount"]
        elif row["type"] == "MoneyWithdrawn":
            account.balance -= row["data"]["amount"]
    return account


NewEvents = list[tuple[uuid.UUID, str, int, str, dict[str, Any]]]


def _decide(envelope: CommandEnvelope, accounts: dict[uuid.UUID, Account]) -> NewEvents:
    payload = envelope.payload
    if envelope.type == "OpenAccount":
        account = accounts[envelope.aggregate_id]
        if account.version:
            raise Rejected("account_exists")
        opened: NewEvents = [
            (
                envelope.aggregate_id,
                "account",
                1,
                "AccountOpened",
                {"owner_id": payload["owner_id"], "currency": payload["currency"]},
            )
        ]
        if payload.get("initial_deposit"):
            opened.append(
                (
                    envelope.aggregate_id,
                    "account",
                    2,
                    "MoneyDeposited",
                    {"amount": payload["initial_deposit"]},
                )
            )
        return opened
    if envelope.type in ("DepositMoney", "WithdrawMoney"):
        account = accounts[envelope.aggregate_id]
        if not account.open:
            raise Rejected("account_not_found")
        amount = int(payload["amount"])
        if envelope.type == "WithdrawMoney" and amount > account.balance:
            raise Rejected("insufficient_funds")
        kind = "MoneyDeposited" if envelope.type == "DepositMoney" else "MoneyWithdrawn"
        return [(envelope.aggregate_id, "account", account.version + 1, kind, {"amount": amount})]
    if envelope.type == "RequestTransfer":
        source = accounts[uuid.UUID(payload["from_account_id"])]
        target = accounts[uuid.UUID(payload["to_account_id"])]
        amount = int(payload["amount"])
        if not (source.open and target.open):
            raise Rejected("account_not_found")
        if amount > source.balance:
            raise Rejected("insufficient_funds")
        return [
            (
                uuid.UUID(payload["from_account_id"]),
                "account",
                source.version + 1,
                "MoneyWithdrawn",
                {"amount": amount},
            ),
            (
                uuid.UUID(payload["to_account_id"]),
                "account",
                target.version + 1,
                "MoneyDeposited",
                {"amount": amount},
            ),
            (envelope.aggregate_id, "transfer", 1, "TransferCompleted", dict(payload)),
        ]
    raise Rejected("unknown_command_type")


async def _declare(channel: AbstractChannel, exchange: str, queue: str) -> AbstractQueue:
    declared = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    found = await channel.declare_queue(queue, durable=True)
    await found.bind(declared, "#")
    return found


async def _until_stopped(
    queue: AbstractQueue, handle: Callable[[AbstractIncomingMessage], Awaitable[None]]
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def consume() -> None:
        async with queue.iterator() as messages:
            async for message in messages:
                await handle(message)  # one at a time: the next is not even looked at

    task = asyncio.create_task(consume())
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def commands_worker(amqp_url: str, dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    await connection.execute(SCHEMA)
    amqp = await aio_pika.connect(amqp_url)
    consume = await amqp.channel()
    await consume.set_qos(prefetch_count=1)
    queue = await _declare(consume, COMMANDS_EXCHANGE, COMMANDS_QUEUE)
    confirmed = await amqp.channel(publisher_confirms=True)
    await _declare(confirmed, EVENTS_EXCHANGE, EVENTS_QUEUE)
    events = await confirmed.get_exchange(EVENTS_EXCHANGE)

    async def handle(message: AbstractIncomingMessage) -> None:
        envelope = CommandEnvelope.model_validate_json(message.body)
        published: list[EventEnvelope] = []
        async with connection.transaction():
            stored = await connection.fetchval(
                "SELECT reply FROM naive_commands WHERE command_id = $1", envelope.command_id
            )
            if stored is not None:
                reply = {**stored, "status": "duplicate"}
            else:
                streams = {envelope.aggregate_id}
                for key in ("from_account_id", "to_account_id"):
                    if key in envelope.payload:
                        streams.add(uuid.UUID(envelope.payload[key]))
                accounts = {stream: await _load(connection, stream) for stream in streams}
                reply = {
                    "command_id": str(envelope.command_id),
                    "status": "accepted",
                    "aggregate_id": str(envelope.aggregate_id),
                    "version": None,
                    "position": None,
                    "error": None,
                }
                try:
                    for stream, aggregate_type, version, kind, data in _decide(envelope, accounts):
                        row = await connection.fetchrow(
                            """INSERT INTO naive_events
                                   (stream_id, aggregate_type, version, type, data)
                               VALUES ($1, $2, $3, $4, $5) RETURNING position, recorded_at""",
                            stream,
                            aggregate_type,
                            version,
                            kind,
                            data,
                        )
                        assert row is not None
                        published.append(
                            EventEnvelope(
                                event_id=uuid.uuid4(),
                                type=kind,
                                aggregate_type=aggregate_type,
                                aggregate_id=stream,
                                version=version,
                                position=row["position"],
                                recorded_at=row["recorded_at"],
                                data=data,
                            )
                        )
                        if stream == envelope.aggregate_id:
                            reply["version"], reply["position"] = version, row["position"]
                except Rejected as e:
                    reply["status"] = "rejected"
                    reply["error"] = {"code": e.code, "message": e.code}
                await connection.execute(
                    "INSERT INTO naive_commands (command_id, reply) VALUES ($1, $2)",
                    envelope.command_id,
                    reply,
                )
        for event in published:
            await events.publish(
                aio_pika.Message(
                    body=event.model_dump_json().encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=str(event.event_id),
                ),
                routing_key=event.routing_key,
            )
        if message.reply_to:
            await consume.default_exchange.publish(
                aio_pika.Message(
                    body=json.dumps(reply).encode(),
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                ),
                routing_key=message.reply_to,
            )
        await message.ack()

    try:
        await _until_stopped(queue, handle)
    finally:
        await amqp.close()
        await connection.close()


async def projector_worker(amqp_url: str, mongo_url: str, database: str) -> None:
    """The same four read models as the project, one event and one write per model at a time:
    account detail, transaction history, per-owner summary, transfer status."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
    db = client[database]
    accounts, transactions = db["naive_accounts"], db["naive_transactions"]
    owners, transfers = db["naive_owner_summaries"], db["naive_transfers"]
    amqp = await aio_pika.connect(amqp_url)
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=1)
    queue = await _declare(channel, EVENTS_EXCHANGE, EVENTS_QUEUE)

    async def handle(message: AbstractIncomingMessage) -> None:
        event = EventEnvelope.model_validate_json(message.body)
        account_id = str(event.aggregate_id)
        now = datetime.now(UTC)
        if event.type == "TransferCompleted":
            with contextlib.suppress(DuplicateKeyError):
                await transfers.insert_one(
                    {"_id": account_id, "status": "completed", **event.data, "updated_at": now}
                )
        elif event.type == "AccountOpened":
            owner, currency = event.data["owner_id"], event.data["currency"]
            with contextlib.suppress(DuplicateKeyError):
                await accounts.insert_one(
                    {
                        "_id": account_id,
                        "owner_id": owner,
                        "currency": currency,
                        "balance": 0,
                        "status": "open",
                        "version": event.version,
                        "updated_at": now,
                    }
                )
                await owners.update_one(
                    {"_id": owner},
                    {
                        "$set": {f"accounts.{account_id}": {"currency": currency, "balance": 0}},
                        "$inc": {f"totals.{currency}.accounts": 1},
                    },
                    upsert=True,
                )
        elif event.type in ("MoneyDeposited", "MoneyWithdrawn"):
            amount = int(event.data["amount"])
            delta = -amount if event.type == "MoneyWithdrawn" else amount
            account = await accounts.find_one_and_update(
                {"_id": account_id, "version": event.version - 1},
                {"$set": {"version": event.version, "updated_at": now}, "$inc": {"balance": delta}},
                return_document=ReturnDocument.AFTER,
            )
            if account is not None:  # else a duplicate: the guard held
                await transactions.insert_one(
                    {
                        "_id": f"{account_id}:{event.version}",
                        "account_id": account_id,
                        "version": event.version,
                        "kind": event.type,
                        "amount": delta,
                        "balance_after": account["balance"],
                        "recorded_at": event.recorded_at,
                    }
                )
                await owners.update_one(
                    {"_id": account["owner_id"]},
                    {
                        "$inc": {
                            f"accounts.{account_id}.balance": delta,
                            f"totals.{account['currency']}.balance": delta,
                        }
                    },
                )
        await message.ack()

    try:
        await _until_stopped(queue, handle)
    finally:
        await amqp.close()
        await client.close()


def main() -> None:
    import uvloop

    match sys.argv[1:]:
        case ["commands", amqp_url, dsn]:
            uvloop.run(commands_worker(amqp_url, dsn))
        case ["projector", amqp_url, mongo_url, database]:
            uvloop.run(projector_worker(amqp_url, mongo_url, database))
        case _:
            raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
