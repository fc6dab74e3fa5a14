"""What every party does with AMQP messages: copy one to publish it elsewhere.

Dead-lettering a command, parking an event and replaying either publish the original body and
properties again with other headers; this is that copy, in one place. A copy may be bounded: a
body over the bound keeps only its first `TRUNCATED_BODY_BYTES` bytes, and the copy says so in
its headers (the original size and its SHA-256), so nobody mistakes it for the whole message.
"""

from __future__ import annotations

import hashlib

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType

# Set only on a copy whose body was cut: the size of the original body in bytes, and its
# SHA-256 in hex (to match the copy with the sender's message, or to tell two apart).
ORIGINAL_SIZE_HEADER = "x-cqrs-original-size"
ORIGINAL_SHA256_HEADER = "x-cqrs-original-sha256"
TRUNCATION_HEADERS = (ORIGINAL_SIZE_HEADER, ORIGINAL_SHA256_HEADER)
# What a cut body keeps: enough to see what the message was, small beside any message limit.
TRUNCATED_BODY_BYTES = 4_096


def copy_message(
    original: AbstractIncomingMessage, headers: HeadersType, *, max_body_bytes: int | None = None
) -> aio_pika.Message:
    """A persistent copy of `original` (body and properties) carrying `headers` instead.

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
    )


def truncation(headers: HeadersType | None) -> tuple[int, str] | None:
    """The original size and SHA-256 of a copy whose body was cut; None for a whole body."""
    size = (headers or {}).get(ORIGINAL_SIZE_HEADER)
    if size is None:
        return None
    digest = (headers or {}).get(ORIGINAL_SHA256_HEADER)
    if isinstance(digest, bytes):
        digest = digest.decode(errors="replace")
    return (size if isinstance(size, int) else -1), str(digest or "")
