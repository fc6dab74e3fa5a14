"""What every party does with AMQP messages: copy one, and declare the queues copies go to.

Dead-lettering a command, parking an event and replaying either publish the original body and
properties again with other headers; this is that copy, in one place. A copy may be bounded: a
body over the bound keeps only its first `TRUNCATED_BODY_BYTES` bytes, and the copy says so in
its headers (the original size and its SHA-256), so nobody mistakes it for the whole message.

The queues such copies collect in are bounded too (`QueueBounds`), declared so that a queue an
older version created without the bounds keeps working (`declare_bounded_queue`).
"""

from __future__ import annotations

import struct
from urllib.parse import parse_qs, unquote, urlsplit

import structlog
from aio_pika.abc import (
    HeadersType,
)
from pamqp import common, decode

log = structlog.get_logger(__name__)

# Set only on a copy whose body was cut: the size of the original body in bytes, and its
# SHA-256 in hex (to match the copy with the sender's message, or to tell two apart).
ORIGINAL_SIZE_HEADER = "x-cqrs-original-size"
ORIGINAL_SHA256_HEADER = "x-cqrs-original-sha256"
TRUNCATION_HEADERS = (ORIGINAL_SIZE_HEADER, ORIGINAL_SHA256_HEADER)
# What a cut body keeps: enough to see what the message was, small beside any message limit.
TRUNCATED_BODY_BYTES = 4_096


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
