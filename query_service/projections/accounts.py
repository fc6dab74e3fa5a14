"""The account-detail read model: one document per account in the `accounts` collection.

Document: `_id` = account id, `id`, `owner_id`, `currency`, `balance`, `status`
(`open` | `frozen` | `closed`), `version`, `opened_at`, `updated_at`, `last_position`.
Listed by owner, status and currency in account-id order, so each filter has an index ending
in `_id`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Literal

from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from query_service.adapters.mongo import Document, VersionedCollection
from query_service.projections.base import ApplyResult, InvalidEvent, event_data
from query_service.projections.bulk import Step, skip_invalid, write_steps
from shared.ledger import (
    ACCOUNT,
    ACCOUNT_EVENTS,
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    MoneyCreditedFromTransfer,
    MoneyDebitedForTransfer,
    MoneyDeposited,
    MoneyWithdrawn,
    TransferDebitRefunded,
    TransferDebitSettled,
)
from shared.messages import Event, EventEnvelope

AccountStatus = Literal["open", "frozen", "closed"]

EVENT_TYPES: Final[dict[str, type[Event]]] = {e.type_name(): e for e in ACCOUNT_EVENTS}


def opened_account(event: AccountOpened, envelope: EventEnvelope) -> dict[str, Any]:
    """The fields of a freshly opened account; its opening deposit arrives as its own event."""
    return {
        "id": str(envelope.aggregate_id),
        "owner_id": event.owner_id,
        "currency": event.currency,
        "balance": 0,
        "status": "open",
        "opened_at": envelope.recorded_at,
        "updated_at": envelope.recorded_at,
    }


def account_update(event: Event, recorded_at: datetime) -> dict[str, Any]:
    """The MongoDB update one event makes to an existing account document."""
    changes: dict[str, Any] = {"$set": {"updated_at": recorded_at}}
    match event:
        case (
            MoneyDeposited(amount=amount)
            | MoneyCreditedFromTransfer(amount=amount)
            | TransferDebitRefunded(amount=amount)
        ):
            changes["$inc"] = {"balance": _positive(amount)}
        case MoneyWithdrawn(amount=amount) | MoneyDebitedForTransfer(amount=amount):
            changes["$inc"] = {"balance": -_positive(amount)}
        case TransferDebitSettled():
            pass  # the money left at the debit; settling only ends the hold
        case AccountFrozen():
            changes["$set"]["status"] = "frozen"
        case AccountUnfrozen():
            changes["$set"]["status"] = "open"
        case AccountClosed():
            changes["$set"]["status"] = "closed"
        case _:
            raise InvalidEvent(f"{event.type_name()} does not change an existing account")
    return changes


def _positive(amount: int) -> int:
    # The command side only emits positive amounts; a sign flip here would silently move money.
    if amount <= 0:
        raise InvalidEvent(f"amount must be positive, got {amount}")
    return amount


NAME: Final = "accounts"


class AccountsProjection:
    """Projects the account events into the `accounts` collection, one version at a time."""

    name: Final = NAME

    def __init__(self, documents: VersionedCollection) -> None:
        self._documents = documents

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == ACCOUNT and envelope.type in EVENT_TYPES

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        event = event_data(EVENT_TYPES[envelope.type], envelope)
        account_id = str(envelope.aggregate_id)
        if isinstance(event, AccountOpened):
            return await self._documents.create(
                account_id,
                version=envelope.version,
                position=envelope.position,
                fields=opened_account(event, envelope),
            )
        return await self._documents.advance(
            account_id,
            version=envelope.version,
            position=envelope.position,
            update=account_update(event, envelope.recorded_at),
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
        if isinstance(event, AccountOpened):
            if envelope.version != 1:
                raise InvalidEvent(f"a creating event must have version 1, not {envelope.version}")
            return Step(
                aggregate_id,
                envelope.version,
                envelope.position,
                fields=opened_account(event, envelope),
            )
        return Step(
            aggregate_id,
            envelope.version,
            envelope.position,
            update=account_update(event, envelope.recorded_at),
        )


class AccountsReadModel:
    """Account detail: one document per account."""

    name: Final = NAME
    collections: Final = (NAME,)
    aggregate_types: Final = frozenset({ACCOUNT})
    version_collection: Final = NAME

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == ACCOUNT and envelope.type in EVENT_TYPES

    def indexes(self) -> Mapping[str, Sequence[IndexModel]]:
        return {
            NAME: [
                IndexModel([("owner_id", 1), ("_id", 1)], name="owner_id"),
                IndexModel([("status", 1), ("currency", 1), ("_id", 1)], name="status_currency"),
                IndexModel([("currency", 1), ("_id", 1)], name="currency"),
            ]
        }

    def bind(self, collections: Mapping[str, AsyncCollection[Document]]) -> AccountsProjection:
        return AccountsProjection(VersionedCollection(collections[NAME]))

    def versions(self, document: Document) -> dict[str, int]:
        return {str(document["_id"]): int(document["version"])}
