"""The account-detail read model: one document per account in the `accounts` collection.

Document: `_id` = account id, `id`, `owner_id`, `currency`, `balance`, `status`
(`open` | `frozen` | `closed`), `version`, `opened_at`, `updated_at`, `last_position`.
Listed by owner, status and currency in account-id order, so each filter has an index ending
in `_id`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pymongo import IndexModel

from query_service.projections.base import InvalidEvent
from query_service.projections.document import DocumentProjection, DocumentReadModel, DocumentRules
from query_service.projections.store import VersionedCollection
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

RULES: Final = DocumentRules(
    name=NAME,
    aggregate_type=ACCOUNT,
    events=ACCOUNT_EVENTS,
    creating=AccountOpened,
    created=opened_account,
    updated=lambda event, envelope: account_update(event, envelope.recorded_at),
    # Listed by owner, status and currency in account-id order.
    indexes=(
        IndexModel([("owner_id", 1), ("_id", 1)], name="owner_id"),
        IndexModel([("status", 1), ("currency", 1), ("_id", 1)], name="status_currency"),
        IndexModel([("currency", 1), ("_id", 1)], name="currency"),
    ),
)


class AccountsProjection(DocumentProjection[AccountOpened]):
    """Projects the account events into the `accounts` collection, one version at a time."""

    def __init__(self, documents: VersionedCollection) -> None:
        super().__init__(RULES, documents)


class AccountsReadModel(DocumentReadModel[AccountOpened]):
    """Account detail: one document per account."""

    def __init__(self) -> None:
        super().__init__(RULES)
