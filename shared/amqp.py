"""What every party does with AMQP messages: copy one to publish it elsewhere.

Dead-lettering a command, parking an event and replaying either publish the original body and
properties again with other headers; this is that copy, in one place.
"""

from __future__ import annotations

import struct

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType
from pamqp import common, decode


def copy_message(original: AbstractIncomingMessage, headers: HeadersType) -> aio_pika.Message:
    """A persistent copy of `original` (body and properties) carrying `headers` instead."""
    return aio_pika.Message(
        body=original.body,
        headers=headers,
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=original.message_id,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        timestamp=original.timestamp,
        type=original.type,
        app_id=original.app_id,
    )


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
