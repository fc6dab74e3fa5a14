"""The transfer-status read model: one document per transfer in the `transfers` collection.

Document: `_id` = transfer id, `id`, `status` (`pending` | `completed` | `failed`),
`from_account_id`, `to_account_id`, `amount`, `failure` (`{code, reason}` or null),
`requested_at`, `updated_at`, `version`, `last_position`. Read by id only.
"""

from __future__ import annotations

from typing import Any, Final

from query_service.projections.base import InvalidEvent
from query_service.projections.document import DocumentProjection, DocumentReadModel, DocumentRules
from query_service.projections.store import VersionedCollection
from shared.ledger import (
    TRANSFER,
    TRANSFER_EVENTS,
    TransferCompleted,
    TransferFailed,
    TransferRequested,
)
from shared.messages import Event, EventEnvelope

NAME: Final = "transfers"


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


RULES: Final = DocumentRules(
    name=NAME,
    aggregate_type=TRANSFER,
    events=TRANSFER_EVENTS,
    creating=TransferRequested,
    created=requested_transfer,
    updated=transfer_update,  # read by `_id` only: no secondary index
)


class TransfersProjection(DocumentProjection[TransferRequested]):
    """Projects the transfer events into the `transfers` collection, one version at a time."""

    def __init__(self, documents: VersionedCollection) -> None:
        super().__init__(RULES, documents)


class TransfersReadModel(DocumentReadModel[TransferRequested]):
    """Transfer status: one document per transfer."""

    def __init__(self) -> None:
        super().__init__(RULES)
