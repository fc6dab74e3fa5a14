"""The references: what the broker, PostgreSQL and MongoDB do with no framework around them.

- AMQP round trip: the client publishes a command-sized message (confirmed); an echo worker
  process consumes it, publishes an event-sized message with an awaited publisher confirm, replies
  and acks; the client receives the reply. The minimum broker work one command needs.
- asyncpg append: the event rows and the command record of the same sizes, in one transaction
  each, positions from the same counter row as the event store; once with the event store's
  statements and once as a single statement.
- AMQP pipelined: what the broker moves when nobody waits per message. The client publishes
  event-sized persistent messages to a durable queue with publisher confirms, `PIPELINE_WINDOW`
  unconfirmed at once (no await per message); a sink worker process consumes them with a
  prefetch of `SINK_PREFETCH` and acks with `multiple=True` every `SINK_ACK_EVERY` messages (and
  whatever is left when the queue goes quiet). The rate is messages published and consumed over
  the time from the first publish until the queue is empty again.
- asyncpg append: the event rows and the command record of the same sizes, in one transaction
  each, positions from the same counter row as the event store; once with the event store's
  statements and once as a single statement.
- MongoDB: version-guarded single-document updates, and the same in ordered bulks.

`python -m bench.raw echo AMQP_URL EVENT_BYTES` runs the echo worker, `python -m bench.raw sink
AMQP_URL` the sink.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import random
import signal
import sys
import time
import uuid
from typing import Any

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pymongo import AsyncMongoClient, UpdateOne

from command_service.adapters.migrations import migrate_schema

COMMANDS_EXCHANGE = "bench.raw.commands"
COMMANDS_QUEUE = "bench.raw.commands"
EVENTS_EXCHANGE = "bench.raw.events"
EVENTS_QUEUE = "bench.raw.events"
PIPELINED_QUEUE = "bench.raw.pipelined"
PIPELINE_WINDOW = 1_000  # publishes awaiting their confirm at once
PIPELINE_CHUNK = 100
SINK_PREFETCH = 1_000
SINK_ACK_EVERY = 200
SINK_FLUSH_SECONDS = 0.05


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


async def sink(amqp_url: str) -> None:
    """Consume `PIPELINED_QUEUE`, acking in batches with `multiple=True`. Until SIGTERM."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=SINK_PREFETCH)
    queue = await channel.declare_queue(PIPELINED_QUEUE, durable=True)
    newest: AbstractIncomingMessage | None = None
    unacked = 0

    async def handle(message: AbstractIncomingMessage) -> None:
        nonlocal newest, unacked
        newest, unacked = message, unacked + 1
        if unacked >= SINK_ACK_EVERY:
            newest, unacked = None, 0
            await message.ack(multiple=True)

    async def flush() -> None:
        # What a batch left unacked when the stream paused or ended.
        nonlocal newest, unacked
        while True:
            await asyncio.sleep(SINK_FLUSH_SECONDS)
            if newest is not None:
                message, newest, unacked = newest, None, 0
                await message.ack(multiple=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    flusher = asyncio.create_task(flush())
    await queue.consume(handle)
    await stop.wait()
    flusher.cancel()
    await connection.close()


async def pipelined_publish(
    amqp_url: str, *, event_bytes: int, seconds: float, window: int = PIPELINE_WINDOW
) -> dict[str, float]:
    """Publish to `PIPELINED_QUEUE` for `seconds` with `window` confirms outstanding; then wait
    until the sink emptied the queue. Messages/s published (confirmed) and moved end to end."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(PIPELINED_QUEUE, durable=True)
        body = b"x" * event_bytes
        # aiormq underneath aio-pika: one frame set and one confirm future per message, no
        # Message object; awaited a chunk at a time, `window` messages unconfirmed at most.
        underlay = await channel.get_underlay_channel()
        properties = aiormq.spec.Basic.Properties(content_type="application/json", delivery_mode=2)
        chunk = max(1, min(PIPELINE_CHUNK, window))
        chunks: collections.deque[asyncio.Future[Any]] = collections.deque()
        published = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            if len(chunks) * chunk >= window:
                await chunks.popleft()  # a nack or a closed channel ends the measurement
            chunks.append(
                asyncio.gather(
                    *(
                        underlay.basic_publish(
                            body, routing_key=PIPELINED_QUEUE, properties=properties
                        )
                        for _ in range(chunk)
                    )
                )
            )
            published += chunk
        for pending in chunks:
            await pending
        confirmed_after = time.perf_counter() - started
        while True:
            declared = await channel.declare_queue(PIPELINED_QUEUE, durable=True, passive=True)
            if not declared.declaration_result.message_count:
                break
            await asyncio.sleep(0.01)
        # The sink's last batch is acked within its flush interval of the queue emptying.
        moved_after = time.perf_counter() - started
    finally:
        await connection.close()
    return {
        "messages": published,
        "published_per_s": published / confirmed_after,
        "moved_per_s": published / moved_after,
        "window": window,
        "event_bytes": event_bytes,
    }


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
    import uvloop

    if len(sys.argv) == 4 and sys.argv[1] == "echo":
        uvloop.run(echo(sys.argv[2], int(sys.argv[3])))
    elif len(sys.argv) == 3 and sys.argv[1] == "sink":
        uvloop.run(sink(sys.argv[2]))
    else:
        raise SystemExit(
            "usage: python -m bench.raw echo AMQP_URL EVENT_BYTES\n"
            "       python -m bench.raw sink AMQP_URL"
        )


if __name__ == "__main__":
    main()
