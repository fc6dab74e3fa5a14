"""The read side's queries: plain functions over the current generation of each read model.

Every function takes validated, typed values (UUIDs, constrained strings, integers) and builds
its MongoDB filter from them as plain values, so no caller input can become a query operator.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, Literal, TypeVar
from uuid import UUID

from bson.decimal128 import Decimal128
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from query_service.domains.ledger import accounts, owners, transactions, transfers
from query_service.service_layer.catalog import ReadModelCatalog

AccountStatus = Literal["open", "frozen", "closed"]


class View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class AccountView(View):
    """An account as the read model holds it and the API shows it."""

    id: UUID
    owner_id: str
    currency: str
    balance: int
    status: AccountStatus
    version: int = Field(description="the account's event version this reflects")
    last_position: int = Field(description="global position of the last event reflected")
    opened_at: datetime
    updated_at: datetime


class AccountPage(View):
    items: list[AccountView]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null at the end"
    )


class TransactionView(View):
    version: int
    position: int
    kind: transactions.TransactionKind
    amount: int = Field(description="signed: credits positive, debits negative")
    balance_after: int
    transfer_id: UUID | None = None
    counterparty_account_id: UUID | None = None
    code: str | None = None
    reason: str | None = None
    recorded_at: datetime


class TransactionPage(View):
    account_id: UUID
    version: int = Field(description="the account's event version the history reflects")
    last_position: int
    items: list[TransactionView]
    next_cursor: str | None


class OwnerAccountView(View):
    id: UUID
    currency: str
    balance: int
    status: AccountStatus
    version: int
    last_position: int
    opened_at: datetime


class CurrencyTotal(View):
    currency: str
    balance: int
    accounts: int = Field(description="accounts in this currency, whatever their status")


class OwnerSummaryView(View):
    owner_id: str
    accounts: list[OwnerAccountView] = Field(
        description="one page of the owner's accounts, in account-id order"
    )
    totals: list[CurrencyTotal] = Field(
        description="per currency, over all the owner's accounts (not only this page's)"
    )
    updated_at: datetime | None = Field(
        default=None, description="when the last event reflected, of any of its accounts, happened"
    )
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page of accounts; null at the end"
    )


class TransferFailure(View):
    code: str
    reason: str


class TransferView(View):
    id: UUID
    status: Literal["pending", "completed", "failed"]
    from_account_id: UUID
    to_account_id: UUID
    amount: int
    failure: TransferFailure | None = None
    version: int
    last_position: int
    requested_at: datetime
    updated_at: datetime


# --- cursors: opaque to clients, strictly validated when they come back ---------------------


class InvalidCursorError(ValueError):
    """A cursor that this API did not hand out."""


class _Cursor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class AccountsCursor(_Cursor):
    after: UUID


class TransactionsCursor(_Cursor):
    before: int = Field(ge=2)


C = TypeVar("C", bound=_Cursor)


def encode_cursor(cursor: _Cursor) -> str:
    raw = json.dumps(cursor.model_dump(mode="json"), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(token: str, model: type[C]) -> C:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return model.model_validate_json(raw, strict=False)
    except (binascii.Error, ValueError, ValidationError) as e:
        raise InvalidCursorError("invalid cursor: pass back a next_cursor this API returned") from e


# --- queries ---------------------------------------------------------------------------------


_ACCOUNT_FIELDS: dict[str, int] = {"_id": 0} | {name: 1 for name in AccountView.model_fields}


async def account_detail(account_id: UUID, *, catalog: ReadModelCatalog) -> AccountView | None:
    """The account with this id, or `None` when the read model does not know it (yet)."""
    collection = await catalog.collection(accounts.NAME)
    found = await collection.find_one({"_id": str(account_id)}, projection=_ACCOUNT_FIELDS)
    return None if found is None else AccountView.model_validate(found)


async def list_accounts(
    *,
    catalog: ReadModelCatalog,
    owner_id: str | None = None,
    status: AccountStatus | None = None,
    currency: str | None = None,
    limit: int = 50,
    cursor: AccountsCursor | None = None,
) -> AccountPage:
    """Accounts matching every given filter, in account-id order, `limit` at a time."""
    query: dict[str, Any] = {}
    if owner_id is not None:
        query["owner_id"] = str(owner_id)
    if status is not None:
        query["status"] = str(status)
    if currency is not None:
        query["currency"] = str(currency)
    if cursor is not None:
        query["_id"] = {"$gt": str(cursor.after)}
    collection = await catalog.collection(accounts.NAME)
    found = (
        await collection.find(query, projection=_ACCOUNT_FIELDS)
        .sort("_id", 1)
        .limit(limit + 1)
        .to_list()
    )
    items = [AccountView.model_validate(document) for document in found[:limit]]
    next_cursor = encode_cursor(AccountsCursor(after=items[-1].id)) if len(found) > limit else None
    return AccountPage(items=items, next_cursor=next_cursor)


async def transaction_head(account_id: UUID, *, catalog: ReadModelCatalog) -> Any:
    heads = await catalog.collection(transactions.NAME, transactions.HEADS)
    return await heads.find_one({"_id": str(account_id)})


async def account_transactions(
    account_id: UUID,
    *,
    catalog: ReadModelCatalog,
    head: dict[str, Any],
    limit: int = 50,
    cursor: TransactionsCursor | None = None,
) -> TransactionPage:
    """One page of the account's history, newest first, as of `head` (its head document).

    Entries beyond the head's version may already be written; they are left out so the page
    matches the version it reports.
    """
    version = int(head["version"])
    below = version + 1 if cursor is None else min(cursor.before, version + 1)
    entries = await catalog.collection(transactions.NAME, transactions.ENTRIES)
    found = (
        await entries.find({"account_id": str(account_id), "version": {"$lt": below}})
        .sort("version", -1)
        .limit(limit + 1)
        .to_list()
    )
    items = [TransactionView.model_validate(document) for document in found[:limit]]
    more = len(found) > limit
    return TransactionPage(
        account_id=account_id,
        version=version,
        last_position=int(head["last_position"]),
        items=items,
        next_cursor=encode_cursor(TransactionsCursor(before=items[-1].version)) if more else None,
    )


async def owner_account_version(
    owner_id: str, account_id: UUID, *, catalog: ReadModelCatalog
) -> dict[str, Any] | None:
    """`version` and `last_position` of one of the owner's accounts in its summary, or `None`."""
    collection = await catalog.collection(owners.NAME)
    return await collection.find_one(
        {"_id": str(account_id), "owner_id": str(owner_id)}, {"version": 1, "last_position": 1}
    )


def owner_totals_pipeline(owner_id: str) -> list[dict[str, Any]]:
    """Per currency, over every account of the owner: balance, number of accounts, last update.

    Balances are summed as decimals: 10^4 accounts at the balance limit already pass 2^63 minor
    units, where a sum of 64-bit integers fails (or turns inexact).
    """
    return [
        {"$match": {"owner_id": str(owner_id)}},
        {
            "$group": {
                "_id": "$currency",
                "balance": {"$sum": {"$toDecimal": "$balance"}},
                "accounts": {"$sum": 1},
                "updated_at": {"$max": "$updated_at"},
            }
        },
        {"$sort": {"_id": 1}},
    ]


def _exact(value: Any) -> int:
    return int(value.to_decimal()) if isinstance(value, Decimal128) else int(value)


# `_id` is the account id; the rest as stored.
_OWNER_ACCOUNT_FIELDS: dict[str, int] = {
    name: 1 for name in OwnerAccountView.model_fields if name != "id"
}


async def owner_summary(
    owner_id: str,
    *,
    catalog: ReadModelCatalog,
    limit: int = 50,
    cursor: AccountsCursor | None = None,
) -> OwnerSummaryView | None:
    """One page of the owner's accounts in account-id order, and the totals over all of them.

    `None` when the read model knows no account of this owner. The totals and the page are two
    reads, each over one generation: while events arrive they may differ by what was projected
    in between, but each account always appears whole, at one of its versions.
    """
    collection = await catalog.collection(owners.NAME)
    totals = await (await collection.aggregate(owner_totals_pipeline(owner_id))).to_list()
    if not totals:
        return None
    query: dict[str, Any] = {"owner_id": str(owner_id)}
    if cursor is not None:
        query["_id"] = {"$gt": str(cursor.after)}
    found = (
        await collection.find(query, projection=_OWNER_ACCOUNT_FIELDS)
        .sort("_id", 1)
        .limit(limit + 1)
        .to_list()
    )
    items = [
        OwnerAccountView.model_validate({**document, "id": document["_id"]})
        for document in found[:limit]
    ]
    next_cursor = encode_cursor(AccountsCursor(after=items[-1].id)) if len(found) > limit else None
    return OwnerSummaryView(
        owner_id=str(owner_id),
        accounts=items,
        totals=[
            CurrencyTotal(
                currency=str(total["_id"]),
                balance=_exact(total["balance"]),
                accounts=int(total["accounts"]),
            )
            for total in totals
        ],
        updated_at=max(
            (total["updated_at"] for total in totals if total.get("updated_at") is not None),
            default=None,
        ),
        next_cursor=next_cursor,
    )


async def transfer_status(transfer_id: UUID, *, catalog: ReadModelCatalog) -> TransferView | None:
    collection = await catalog.collection(transfers.NAME)
    found = await collection.find_one({"_id": str(transfer_id)})
    return None if found is None else TransferView.model_validate(found)
