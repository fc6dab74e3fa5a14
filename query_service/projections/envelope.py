"""Reading an event envelope from a message body, once, or saying precisely why not.

The live projector parks what it cannot read with that reason; a replay skips it the same way.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pydantic import ValidationError

from shared.messages import EventEnvelope
from shared.topology import AGGREGATE_ID_HEADER

# An event envelope is a few hundred bytes; anything near this is not one of ours.
MAX_BODY_BYTES = 1_048_576


class UnreadableMessage(Exception):
    """The message body is not an event envelope we can route to a projection."""


def parse_envelope(
    body: bytes, headers: dict[str, Any] | None = None, *, max_bytes: int = MAX_BODY_BYTES
) -> EventEnvelope:
    """Read an event envelope from a message body, or say precisely why not."""
    if len(body) > max_bytes:
        raise UnreadableMessage(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        envelope = EventEnvelope.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(error["type"] == "json_invalid" for error in errors):
            raise UnreadableMessage(f"malformed JSON: {errors[0]['msg']}") from e
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in errors
        )
        raise UnreadableMessage(f"invalid event envelope: {problems}") from e
    header = (headers or {}).get(AGGREGATE_ID_HEADER)
    # The partition was chosen by the header; if it lies, this aggregate's order is not guaranteed.
    if header is not None and as_uuid(header) != envelope.aggregate_id:
        raise UnreadableMessage(
            f"header {AGGREGATE_ID_HEADER}={header!r} does not match the envelope's "
            f"aggregate_id {envelope.aggregate_id}"
        )
    return envelope


def as_uuid(value: object) -> UUID | None:
    """A header's value as an aggregate id (`None`: it is none)."""
    try:
        return UUID(value.decode() if isinstance(value, bytes) else str(value))
    except ValueError:
        return None
