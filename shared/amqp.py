"""What every party does with AMQP messages: copy one, and declare the queues copies go to.

Dead-lettering a command, parking an event and replaying either publish the original body and
properties again with other headers; this is that copy, in one place. A copy may be bounded: a
body over the bound keeps only its first `TRUNCATED_BODY_BYTES` bytes, and the copy says so in
its headers (the original size and its SHA-256), so nobody mistakes it for the whole message.

The queues such copies collect in are bounded too (`QueueBounds`), declared so that a queue an
older version created without the bounds keeps working (`declare_bounded_queue`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

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
from pamqp import common, decode

log = structlog.get_logger(__name__)

# Set only on a copy whose body was cut: the size of the original body in bytes, and its
# SHA-256 in hex (to match the copy with the sender's message, or to tell two apart).
ORIGINAL_SIZE_HEADER = "x-cqrs-original-size"
ORIGINAL_SHA256_HEADER = "x-cqrs-original-sha256"
TRUNCATION_HEADERS = (ORIGINAL_SIZE_HEADER, ORIGINAL_SHA256_HEADER)
# What a cut body keeps: enough to see what the message was, small beside any message limit.
TRUNCATED_BODY_BYTES = 4_096


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


def broker_login(amqp_url: str) -> str | None:
    """The login a connection to `amqp_url` authenticates as, for its messages' `user_id`.

    The URL's user name, percent-decoded; `guest` when it names none (what the driver then
    sends). None with `auth=external` (a client certificate): the broker derives that login
    from the certificate, which the URL does not say.
    """
    parts = urlsplit(amqp_url)
    mechanism = parse_qs(parts.query).get("auth", ["plain"])[-1]
    if mechanism.upper() == "EXTERNAL":
        return None
    return unquote(parts.username) if parts.username else "guest"


def truncation(headers: HeadersType | None) -> tuple[int, str] | None:
    """The original size and SHA-256 of a copy whose body was cut; None for a whole body."""
    size = (headers or {}).get(ORIGINAL_SIZE_HEADER)
    if size is None:
        return None
    digest = (headers or {}).get(ORIGINAL_SHA256_HEADER)
    if isinstance(digest, bytes):
        digest = digest.decode(errors="replace")
    return (size if isinstance(size, int) else -1), str(digest or "")


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


def tolerate_invalid_utf8() -> None:
    """Decode AMQP short strings (properties, routing keys, header names) with replacement.

    RabbitMQ passes their bytes through unchecked, and the AMQP codec decodes them as strict
    UTF-8: one message whose `message_id` or a header name is not UTF-8 makes the driver drop the
    whole connection, and the redelivery drops it again, forever. Decoded with U+FFFD in place
    of the bad bytes, the message reaches the consumer, which answers it like any bad input.
    Installed once per process by each service's composition root and by the client.
    """
    if getattr(decode.short_str, "lenient", False):
        return

    def short_str(value: bytes) -> tuple[int, str]:
        try:
            length = common.Struct.byte.unpack(value[0:1])[0]
        except (struct.error, TypeError) as err:
            raise ValueError("Could not unpack short string value") from err
        return length + 1, value[1 : length + 1].decode("utf-8", "replace")

    def field_table(value: bytes) -> tuple[int, common.FieldTable]:
        # pamqp's own, but for the key: decoded with replacement.
        try:
            length = common.Struct.integer.unpack(value[0:4])[0]
            offset, end = 4, 4 + length
            if end > len(value):
                raise ValueError("Field table length exceeds available data")
            data: common.FieldTable = {}
            while offset < end:
                key_length = common.Struct.byte.unpack_from(value, offset)[0]
                offset += 1
                if offset + key_length > end:
                    raise ValueError("Field table key length exceeds data")
                key = value[offset : offset + key_length].decode("utf-8", "replace")
                offset += key_length
                consumed, result = decode.embedded_value(value[offset:])
                offset += consumed
                data[key] = result
            return end, data
        except (struct.error, TypeError) as err:
            raise ValueError("Could not unpack data") from err

    short_str.lenient = True  # type: ignore[attr-defined]
    decode.short_str = short_str
    decode.field_table = field_table
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["table"] = field_table
    decode.TABLE_MAPPING[b"F"] = field_table
