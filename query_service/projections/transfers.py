"""The transfer-status read model: one document per transfer in the `transfers` collection.

Document: `_id` = transfer id, `id`, `status` (`pending` | `completed` | `failed`),
`from_account_id`, `to_account_id`, `amount`, `failure` (`{code, reason}` or null),
`requested_at`, `updated_at`, `version`, `last_position`. Read by id only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from query_service.adapters.mongo import Document, VersionedCollection
from query_service.projections.base import ApplyResult, InvalidEvent, event_data
from query_service.projections.bulk import Step, skip_invalid, write_steps
from shared.ledger import (
    TRANSFER,
    TRANSFER_EVENTS,
    TransferCompleted,
    TransferFailed,
    TransferRequested,
)
from shared.messages import Event, EventEnvelope

NAME: Final = "transfers"

EVENT_TYPES: Final[dict[str, type[Event]]] = {e.type_name(): e for e in TRANSFER_EVENTS}


def requested_transfer(event: TransferRequested, envelope: EventEnvelope) -> dict[str, Any]:
    if event.amount <= 0:
        raise InvalidEvent(f"amount must be positive, got {event.amount}")
    return {
        "id": str(envelope.aggregate_id),
        "status": "pending",
        "from_account_id": str(event.from_account_id),
        "to_account_id": str(event.to_account_id),
        "amount": event.amount,
        "failure": None,
        "requested_at": envelope.recorded_at,
        "updated_at": envelope.recorded_at,
    }


def transfer_update(event: Event, envelope: EventEnvelope) -> dict[str, Any]:
    match event:
        case TransferCompleted():
            changes: dict[str, Any] = {"status": "completed"}
        case TransferFailed(code=code, reason=reason):
            changes = {"status": "failed", "failure": {"code": code, "reason": reason}}
        case _:
            raise InvalidEvent(f"{event.type_name()} does not change an existing transfer")
    return {"$set": {**changes, "updated_at": envelope.recorded_at}}


class TransfersProjection:
    """Projects the transfer events into the `transfers` collection, one version at a time."""

    name: Final = NAME

    def __init__(self, documents: VersionedCollection) -> None:
        self._documents = documents

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == TRANSFER and envelope.type in EVENT_TYPES

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        event = event_data(EVENT_TYPES[envelope.type], envelope)
        transfer_id = str(envelope.aggregate_id)
        if isinstance(event, TransferRequested):
            return await self._documents.create(
                transfer_id,
                version=envelope.version,
                position=envelope.position,
                fields=requested_transfer(event, envelope),
            )
        return await self._documents.advance(
            transfer_id,
            version=envelope.version,
            position=envelope.position,
            update=transfer_update(event, envelope),
        )

    async def apply_batch(self, envelopes: Sequence[EventEnvelope]) -> None:
        steps = [
            step
            for envelope in envelopes
            if self.handles(envelope) and (step := skip_invalid(self._step, envelope)) is not None
        ]
        await write_steps(self._documents.collection, steps)

    def _step(self, envelope: EventEnvelope) -> Step:
        event = event_data(EVENT_TYPES[envelope.type], envelope)
        aggregate_id = str(envelope.aggregate_id)
        if isinstance(event, TransferRequested):
            if envelope.version != 1:
                raise InvalidEvent(f"a creating event must have version 1, not {envelope.version}")
            return Step(
                aggregate_id,
                envelope.version,
                envelope.position,
                fields=requested_transfer(event, envelope),
            )
        return Step(
            aggregate_id,
            envelope.version,
            envelope.position,
            update=transfer_update(event, envelope),
        )


class TransfersReadModel:
    """Transfer status: one document per transfer."""

    name: Final = NAME
    collections: Final = (NAME,)
    aggregate_types: Final = frozenset({TRANSFER})
    version_collection: Final = NAME

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == TRANSFER and envelope.type in EVENT_TYPES

    def indexes(self) -> Mapping[str, Sequence[IndexModel]]:
        return {}  # read by `_id` only

    def bind(self, collections: Mapping[str, AsyncCollection[Document]]) -> TransfersProjection:
        return TransfersProjection(VersionedCollection(collections[NAME]))

    def versions(self, document: Document) -> dict[str, int]:
        return {str(document["_id"]): int(document["version"])}
