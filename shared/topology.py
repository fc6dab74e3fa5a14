"""Broker names: the public exchanges and the queues each service owns.

Clients publish commands to `COMMANDS_EXCHANGE` with routing key `<aggregate_type>.<CommandType>`
and the `aggregate_id` header; events leave on `EVENTS_EXCHANGE` with routing key
`<aggregate_type>.<EventType>`.
"""

from __future__ import annotations

COMMANDS_EXCHANGE = "cqrs.commands"
EVENTS_EXCHANGE = "cqrs.events"

# Header that carries the aggregate id; consistent-hash exchanges partition on it. A command
# published without it still arrives, but every such command lands in the same partition.
AGGREGATE_ID_HEADER = "aggregate_id"
# Header set on dead-lettered and parked messages.
REASON_HEADER = "x-cqrs-reason"
# On a parked event: the exchange and routing key it arrived with (a replay sends it back
# with that key, so it lands in its aggregate's partition again).
ORIGINAL_EXCHANGE_HEADER = "x-cqrs-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-cqrs-original-routing-key"
# On a dead-lettered command: who sent it (the broker-verified AMQP `user_id`); absent when the
# command had none. Set only by the command service.
SENDER_HEADER = "x-cqrs-sender"

# Command service: commands partitioned by aggregate id into single-active-consumer queues.
COMMAND_PARTITION_EXCHANGE = "cqrs.commands.partitioned"
COMMAND_DEAD_LETTER_EXCHANGE = "cqrs.commands.dead"
COMMAND_DEAD_LETTER_QUEUE = "cqrs.commands.dead"
# Clients' exclusive reply queues are named with this prefix (broker users may be scoped to it).
REPLY_QUEUE_PREFIX = "cqrs.reply."

# Query service: events partitioned by aggregate id for the projector replicas.
PROJECTOR_PARTITION_EXCHANGE = "cqrs.projector.partitioned"
PROJECTOR_PARKED_EXCHANGE = "cqrs.projector.parked"
PROJECTOR_PARKED_QUEUE = "cqrs.projector.parked"


def command_partition_queue(index: int) -> str:
    return f"cqrs.commands.p{index}"


def projector_partition_queue(index: int) -> str:
    return f"cqrs.projector.p{index}"


def routing_key(aggregate_type: str, message_type: str) -> str:
    return f"{aggregate_type}.{message_type}"


# Replays for read-model rebuilds: the query service publishes a `ReplayRequest` to the
# `cqrs.replay` exchange with routing key `REPLAY_REQUESTS_QUEUE` (a named exchange, so that its
# broker user needs no write access to the default exchange); a command-service replica
# streams the stored events, in position order, into the request's `reply_queue`, framed by
# `ReplayStarted` and `ReplayFinished` messages.
REPLAY_EXCHANGE = "cqrs.replay"
REPLAY_REQUESTS_QUEUE = "cqrs.replay.requests"
REPLAY_STARTED = "ReplayStarted"
REPLAY_FINISHED = "ReplayFinished"


def declared_names(max_partitions: int) -> tuple[list[str], list[str]]:
    """Every queue and exchange the two services declare, for up to `max_partitions` partitions.

    For tools that clear a vhost (tests, benchmarks); queues first, as they bind to exchanges.
    """
    queues = [COMMAND_DEAD_LETTER_QUEUE, PROJECTOR_PARKED_QUEUE, REPLAY_REQUESTS_QUEUE]
    queues += [command_partition_queue(i) for i in range(max_partitions)]
    queues += [projector_partition_queue(i) for i in range(max_partitions)]
    exchanges = [
        COMMAND_PARTITION_EXCHANGE,
        COMMAND_DEAD_LETTER_EXCHANGE,
        PROJECTOR_PARTITION_EXCHANGE,
        PROJECTOR_PARKED_EXCHANGE,
        COMMANDS_EXCHANGE,
        EVENTS_EXCHANGE,
        REPLAY_EXCHANGE,
    ]
    return queues, exchanges
