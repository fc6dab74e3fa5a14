"""The references: what the broker, PostgreSQL and MongoDB do with no framework around them.

- AMQP round trip: the client publishes a command-sized message (confirmed); an echo worker
  process consumes it, publishes an event-sized message with an awaited publisher confirm, replies
  and acks; the client receives the reply. The minimum broker work one command needs.
- asyncpg append: the event rows and the command record of the same sizes, in one transaction
  each, positions from the same counter row as the event store; once with the event store's
  statements and once as a single statement.
- MongoDB: version-guarded single-document updates, and the same in ordered bulks.

`python -m bench.raw echo AMQP_URL EVENT_BYTES` runs the echo worker.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import sys
import time
import uuid
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pymongo import AsyncMongoClient, UpdateOne

from command_service.adapters.migrations import migrate_schema

COMMANDS_EXCHANGE = "bench.raw.commands"
COMMANDS_QUEUE = "bench.raw.commands"
EVENTS_EXCHANGE = "bench.raw.events"
EVENTS_QUEUE = "bench.raw.events"


async def echo(amqp_url: str, event_bytes: int, prefetch: int = 256) -> None:
    """Consume commands; per message: confirmed event publish, reply, ack. Until SIGTERM."""
    connection = await aio_pika.connect(amqp_url)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=prefetch)
    confirmed = await connection.channel(publisher_confirms=True)
    replies = await connection.channel(publisher_confirms=False)
    commands = await consume.declare_exchange(
        COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await consume.declare_queue(COMMANDS_QUEUE, durable=True)
    await queue.bind(commands, "#")
    events = await confirmed.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    # Events are routed to a durable queue and persisted, as the project's are.
    events_queue = await confirmed.declare_queue(EVENTS_QUEUE, durable=True)
    await events_queue.bind(events, "#")
    event_body = b"x" * event_bytes

    async def handle(message: AbstractIncomingMessage) -> None:
        await events.publish(
            aio_pika.Message(
                body=event_body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                headers=dict(message.headers or {}),
            ),
            routing_key=message.routing_key or "",
        )
        reply = {
            "command_id": message.correlation_id,
            "status": "accepted",
            "aggregate_id": None,
            "version": 1,
            "position": 1,
            "error": None,
        }
        await replies.default_exchange.publish(
            aio_pika.Message(
                body=json.dumps(reply).encode(),
                content_type="application/json",
                correlation_id=message.correlation_id,
            ),
            routing_key=message.reply_to or "",
        )
        await message.ack()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await queue.consume(handle)
    await stop.wait()
    await connection.close()


async def _jsonb(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


_INSERT_EVENTS = """INSERT INTO events (position, event_id, stream_id, aggregate_type, version,
                                       type, schema_version, data, metadata)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"""
_INSERT_COMMAND = "INSERT INTO commands (command_id, aggregate_id, reply) VALUES ($1, $2, $3)"
# The same writes in one round trip, the counter row locked for one statement only.
_ONE_STATEMENT = """
WITH pos AS (UPDATE event_position SET last = last + cardinality($2::uuid[]) RETURNING last),
     ev AS (
       INSERT INTO events (position, event_id, stream_id, aggregate_type, version, type,
                           schema_version, data, metadata)
       SELECT pos.last - cardinality($2::uuid[]) + e.n, e.event_id, $1, 'account',
              $3 + e.n, e.type, 1, e.data, $5
       FROM pos, unnest($2::uuid[], $4::text[], $6::jsonb[]) WITH ORDINALITY
            AS e(event_id, type, data, n)
       RETURNING position)
INSERT INTO commands (command_id, aggregate_id, reply)
SELECT $7, $1, jsonb_set($8::jsonb, '{position}', to_jsonb((SELECT max(position) FROM ev)))
"""


def _event_count(rng: random.Random) -> int:
    # The mix: an OpenAccount with its opening deposit appends two events, the rest one.
    return 2 if rng.random() < 0.1 else 1


async def raw_append(
    dsn: str, *, seconds: float, concurrency: int, one_statement: bool
) -> dict[str, float]:
    """Appends/s and events/s of the event store's transaction with no framework around it."""
    await migrate_schema(dsn)  # the event store's tables, as the command service has them
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency, init=_jsonb)
    assert pool is not None
    appends = 0
    events = 0
    data = {"amount": 512}

    async def worker(seed: int) -> None:
        nonlocal appends, events
        rng = random.Random(seed)
        stream = uuid.uuid4()
        version = 0
        while time.perf_counter() < deadline:
            count = _event_count(rng)
            command_id = uuid.uuid4()
            metadata = {"correlation_id": str(command_id), "causation_id": str(command_id)}
            reply: dict[str, Any] = {
                "command_id": str(command_id),
                "status": "accepted",
                "aggregate_id": str(stream),
                "version": version + count,
                "position": None,
                "error": None,
            }
            async with pool.acquire() as connection, connection.transaction():
                if one_statement:
                    await connection.execute(
                        _ONE_STATEMENT,
                        stream,
                        [uuid.uuid4() for _ in range(count)],
                        version,
                        ["MoneyDeposited"] * count,
                        metadata,
                        [data] * count,
                        command_id,
                        reply,
                    )
                else:
                    last = await connection.fetchval(
                        "UPDATE event_position SET last = last + $1 RETURNING last", count
                    )
                    first = last - count + 1
                    await connection.executemany(
                        _INSERT_EVENTS,
                        [
                            (
                                first + i,
                                uuid.uuid4(),
                                stream,
                                "account",
                                version + 1 + i,
                                "MoneyDeposited",
                                1,
                                data,
                                metadata,
                            )
                            for i in range(count)
                        ],
                    )
                    reply["position"] = last
                    await connection.execute(_INSERT_COMMAND, command_id, stream, reply)
            version += count
            if time.perf_counter() >= started:
                appends += 1
                events += count

    try:
        warmup = min(1.0, seconds / 4)
        started = time.perf_counter() + warmup
        deadline = started + seconds
        await asyncio.gather(*(worker(seed) for seed in range(concurrency)))
    finally:
        await pool.close()
    return {"appends_per_s": appends / seconds, "events_per_s": events / seconds}


async def raw_mongo(
    mongo_url: str, database: str, *, seconds: float, concurrency: int, bulks: tuple[int, ...]
) -> dict[str, float]:
    """Version-guarded updates/s: one document per call, and in ordered bulks of each size."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
    try:
        collection = client[database]["raw_accounts"]
        documents = concurrency * 16
        await collection.insert_many(
            [{"_id": str(i), "version": 0, "balance": 0} for i in range(documents)]
        )
        versions = [0] * documents
        updates = 0

        def guarded(index: int) -> tuple[dict[str, Any], dict[str, Any]]:
            versions[index] += 1
            return (
                {"_id": str(index), "version": versions[index] - 1},
                {
                    "$set": {"version": versions[index], "updated_at": time.time()},
                    "$inc": {"balance": 7},
                },
            )

        async def single(worker: int) -> None:
            nonlocal updates
            mine = itertools.cycle(range(worker, documents, concurrency))
            while time.perf_counter() < deadline:
                await collection.update_one(*guarded(next(mine)))
                updates += 1

        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(single(w) for w in range(concurrency)))

        rates = {"single_updates_per_s": updates / seconds}
        ring = itertools.cycle(range(documents))
        for size in bulks:
            updates = 0
            started = time.perf_counter()
            deadline = started + seconds
            while time.perf_counter() < deadline:
                await collection.bulk_write(
                    [UpdateOne(*guarded(next(ring))) for _ in range(size)], ordered=True
                )
                updates += size
            rates[f"bulk_{size}_updates_per_s"] = updates / (time.perf_counter() - started)
    finally:
        await client.close()
    return rates


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] != "echo":
        raise SystemExit("usage: python -m bench.raw echo AMQP_URL EVENT_BYTES")
    import uvloop

    uvloop.run(echo(sys.argv[2], int(sys.argv[3])))


if __name__ == "__main__":
    main()
