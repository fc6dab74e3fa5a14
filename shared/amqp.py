"""What every party does with AMQP messages: copy one to publish it elsewhere.

Dead-lettering a command, parking an event and replaying either publish the original body and
properties again with other headers; this is that copy, in one place.
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType


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
