"""Copies of AMQP messages and the bounded queues they collect in: what both services do when
they set a message aside (a dead-lettered command, a parked event) or replay one.

A copy may be bounded: a body over the bound keeps only its first `TRUNCATED_BODY_BYTES` bytes,
and the copy says so in its headers (the original size and its SHA-256, `shared.amqp`), so
nobody mistakes it for the whole message. The queues such copies collect in are bounded too
(`QueueBounds`), declared so that a queue an older version created without the bounds keeps
working (`declare_bounded_queue`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    FieldValue,
    HeadersType,
)
from aio_pika.exceptions import ChannelPreconditionFailed

from shared.amqp import (
    ORIGINAL_SHA256_HEADER,
    ORIGINAL_SIZE_HEADER,
    TRUNCATED_BODY_BYTES,
    TRUNCATION_HEADERS,
)

log = structlog.get_logger(__name__)


def copy_message(
    original: AbstractIncomingMessage,
    headers: HeadersType,
    *,
    max_body_bytes: int | None = None,
    user_id: str | None = None,
) -> aio_pika.Message:
    """A persistent copy of `original` (body and properties) carrying `headers` instead.

    The copy's `user_id` is `user_id`, never the original's: the broker accepts only the
    publishing connection's own login there.

    With `max_body_bytes`, a longer body is cut to its first `TRUNCATED_BODY_BYTES` bytes (at
    most `max_body_bytes`) and the truncation headers are added. Truncation headers in `headers`
    are dropped otherwise: only a cut made here may claim one.
    """
    body = original.body
    copied = {key: value for key, value in headers.items() if key not in TRUNCATION_HEADERS}
    if max_body_bytes is not None and len(body) > max_body_bytes:
        copied[ORIGINAL_SIZE_HEADER] = len(body)
        copied[ORIGINAL_SHA256_HEADER] = hashlib.sha256(body).hexdigest()
        body = body[: min(TRUNCATED_BODY_BYTES, max_body_bytes)]
    return aio_pika.Message(
        body=body,
        headers=copied,
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=original.message_id,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        timestamp=original.timestamp,
        type=original.type,
        app_id=original.app_id,
        user_id=user_id,
    )


@dataclass(frozen=True)
class QueueBounds:
    """The most a queue holds, in messages and in body bytes, and what happens beyond that.

    `drop-head`: the oldest message is dropped to make room (for copies whose originals were
    answered, such as dead letters). `reject-publish`: the broker refuses the new message with a
    negative confirm, so its publisher keeps the original and tries again later (for what must
    not be lost, such as parked events).
    """

    max_messages: int
    max_bytes: int
    overflow: Literal["drop-head", "reject-publish"]

    def arguments(self) -> dict[str, FieldValue]:
        return {
            "x-max-length": self.max_messages,
            "x-max-length-bytes": self.max_bytes,
            "x-overflow": self.overflow,
        }

    def policy_definition(self) -> str:
        """The same bounds as a RabbitMQ policy definition (JSON), for `rabbitmqctl set_policy`."""
        return (
            f'{{"max-length":{self.max_messages},"max-length-bytes":{self.max_bytes},'
            f'"overflow":"{self.overflow}"}}'
        )


async def declare_bounded_queue(
    channel: AbstractChannel, name: str, bounds: QueueBounds
) -> AbstractQueue:
    """Declare the durable queue `name` with `bounds`; if it exists with other arguments, use it.

    RabbitMQ refuses a redeclaration with other arguments (PRECONDITION_FAILED, which closes the
    channel), so a queue an older version declared without bounds, or with other values, would
    stop the service at start. The declaration is tried on a channel of its own first; when it
    is refused, the queue is used as it is and a WARNING tells the operator to apply the bounds
    as a policy (policies apply to existing queues; the lower of a policy's and an argument's
    limit wins).
    """
    underlay = await channel.get_underlay_channel()
    probe = await underlay.connection.channel()
    try:
        await probe.queue_declare(name, durable=True, arguments=bounds.arguments())
    except ChannelPreconditionFailed as e:
        log.warning(
            "queue_bounds_not_applied",
            queue=name,
            wanted=bounds.arguments(),
            error=str(e),
            fix=(
                f"rabbitmqctl set_policy -p <vhost> --apply-to queues {name}-bounds "
                f"'^{name.replace('.', '[.]')}$' '{bounds.policy_definition()}'"
            ),
        )
        return await channel.declare_queue(name, passive=True)
    finally:
        if not probe.is_closed:
            await probe.close()
    return await channel.declare_queue(name, durable=True, arguments=bounds.arguments())
