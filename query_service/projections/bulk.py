"""Writing a run of replayed events with one ordered bulk write per collection.

Every operation carries its own version guard, so an ordered bulk write has the effect of
applying the events one by one; only the per-event outcome is not reported, which a rebuild
does not need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import structlog
from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from query_service.adapters.mongo import Document, is_duplicate_only
from query_service.projections.base import InvalidEvent, Projection
from shared.messages import EventEnvelope

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

T = TypeVar("T")


def skip_invalid(build: Callable[[EventEnvelope], T], envelope: EventEnvelope) -> T | None:
    """`build(envelope)`, or `None` for an event that can never be applied.

    The live projector parked such an event, so its aggregate stopped there; here the version
    guard of the aggregate's later events stops it at the same place.
    """
    try:
        return build(envelope)
    except InvalidEvent as e:
        log.warning(
            "replayed_event_not_applicable",
            event_id=str(envelope.event_id),
            position=envelope.position,
            reason=str(e),
        )
        return None


async def write_in_order(
    collection: AsyncCollection[Document],
    ops: Sequence[UpdateOne],
    projection: Projection,
    envelopes: Sequence[EventEnvelope],
) -> None:
    """One ordered bulk write; when an upsert collided with a concurrent insert, go one by one."""
    if not ops:
        return
    try:
        await collection.bulk_write(list(ops), ordered=True)
    except BulkWriteError as e:
        if not is_duplicate_only(e):
            raise
        await apply_one_by_one(projection, envelopes)


async def apply_one_by_one(projection: Projection, envelopes: Sequence[EventEnvelope]) -> None:
    for envelope in envelopes:
        if projection.handles(envelope):
            try:
                await projection.apply(envelope)
            except InvalidEvent:
                continue
