"""The transaction-history read model: one entry per movement of money on an account.

Two collections per generation:

- `transaction_heads`: one document per account, `_id` = account id, with the `version` and
  `balance` reached and `last_position`; it is the version guard of the history;
- `transactions`: one entry per deposit, withdrawal and transfer leg, `_id` =
  `<account id>:<version>`, with `account_id`, `version`, `position`, `kind`, a signed `amount`,
  `balance_after`, `transfer_id`, `counterparty_account_id`, `code`, `reason`, `recorded_at`;
  listed newest first through the index on (`account_id`, `version` descending).

An event's entry is written before its head moves, and readers show only entries up to the
head's version, so a reader never sees a version without its entry nor an entry ahead of the
head. An entry's content follows from the account's history alone, so writing it twice (a
redelivery, a rebuild racing the live projector) writes the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from query_service.projections.base import Applied, ApplyResult, InvalidEvent, event_data
from query_service.projections.bulk import Step, insert_ignoring_duplicates, write_steps
from query_service.projections.store import Document, VersionedCollection
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

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

NAME: Final = "transactions"
ENTRIES: Final = "transactions"
HEADS: Final = "transaction_heads"

TransactionKind = Literal["deposit", "withdrawal", "transfer_out", "transfer_in", "transfer_refund"]

EVENT_TYPES: Final[dict[str, type[Event]]] = {e.type_name(): e for e in ACCOUNT_EVENTS}


@dataclass(frozen=True)
class Movement:
    """What one event does to an account's money; `None` fields do not apply."""

    kind: TransactionKind
    amount: int  # signed: credits positive, debits negative
    transfer_id: str | None = None
    counterparty_account_id: str | None = None
    code: str | None = None
    reason: str | None = None


def movement(event: Event) -> Movement | None:
    """The money movement of an account event, or `None` for events that move no money."""
    match event:
        case MoneyDeposited(amount=amount):
            return Movement("deposit", _positive(amount))
        case MoneyWithdrawn(amount=amount):
            return Movement("withdrawal", -_positive(amount))
        case MoneyDebitedForTransfer(amount=amount, transfer_id=transfer, to_account_id=to):
            return Movement("transfer_out", -_positive(amount), str(transfer), str(to))
        case MoneyCreditedFromTransfer(amount=amount, transfer_id=transfer, from_account_id=src):
            return Movement("transfer_in", _positive(amount), str(transfer), str(src))
        case TransferDebitRefunded(amount=amount, transfer_id=transfer, code=code, reason=reason):
            return Movement(
                "transfer_refund", _positive(amount), str(transfer), code=code, reason=reason
            )
        case AccountFrozen() | AccountUnfrozen() | AccountClosed() | TransferDebitSettled():
            return None
        case _:
            raise InvalidEvent(f"{event.type_name()} does not change an existing account")


def _positive(amount: int) -> int:
    if amount <= 0:
        raise InvalidEvent(f"amount must be positive, got {amount}")
    return amount


def entry_id(account_id: str, version: int) -> str:
    return f"{account_id}:{version}"


def entry_document(envelope: EventEnvelope, moved: Movement, balance_after: int) -> Document:
    account_id = str(envelope.aggregate_id)
    return {
        "_id": entry_id(account_id, envelope.version),
        "account_id": account_id,
        "version": envelope.version,
        "position": envelope.position,
        "kind": moved.kind,
        "amount": moved.amount,
        "balance_after": balance_after,
        "transfer_id": moved.transfer_id,
        "counterparty_account_id": moved.counterparty_account_id,
        "code": moved.code,
        "reason": moved.reason,
        "recorded_at": envelope.recorded_at,
    }


def _head_update(moved: Movement | None) -> dict[str, Any]:
    return {"$inc": {"balance": moved.amount}} if moved is not None and moved.amount else {}


class TransactionsProjection:
    """Projects account events into the history, one version at a time per account."""

    name: Final = NAME

    def __init__(
        self, entries: AsyncCollection[Document], heads: AsyncCollection[Document]
    ) -> None:
        self._entries = entries
        self._heads = VersionedCollection(heads)

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == ACCOUNT and envelope.type in EVENT_TYPES

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        event = event_data(EVENT_TYPES[envelope.type], envelope)
        account_id = str(envelope.aggregate_id)
        if isinstance(event, AccountOpened):
            return await self._heads.create(
                account_id,
                version=envelope.version,
                position=envelope.position,
                fields={"balance": 0},
            )
        moved = movement(event)
        head = await self._heads.collection.find_one(
            {"_id": account_id}, {"version": 1, "balance": 1}
        )
        if head is None:
            return ApplyResult.gap(None)
        stored = int(head["version"])
        if stored >= envelope.version:
            return ApplyResult.duplicate(stored)
        if stored != envelope.version - 1:
            return ApplyResult.gap(stored)
        if moved is not None:
            document = entry_document(envelope, moved, int(head["balance"]) + moved.amount)
            # Already there when written before a crash, or by a rebuild: the same content.
            with contextlib.suppress(DuplicateKeyError):
                await self._entries.insert_one(document)
        return await self._heads.advance(
            account_id,
            version=envelope.version,
            position=envelope.position,
            update=_head_update(moved),
        )

    async def apply_many(self, envelopes: Sequence[EventEnvelope]) -> list[Applied]:
        """The live projector's batch: the heads read in one round trip, the entries inserted
        in one and the heads moved in one (each account's events folded), entries first."""
        heads = await self._read_heads(envelopes)
        results: list[Applied] = []
        entries: list[Document] = []
        steps: list[Step] = []
        for envelope in envelopes:
            account_id = str(envelope.aggregate_id)
            try:
                event = event_data(EVENT_TYPES[envelope.type], envelope)
                if isinstance(event, AccountOpened):
                    if envelope.version != 1:
                        raise InvalidEvent(
                            f"a creating event must have version 1, not {envelope.version}"
                        )
                    moved = None
                else:
                    moved = movement(event)
            except InvalidEvent as e:
                results.append(e)
                continue
            current = heads.get(account_id)
            if isinstance(event, AccountOpened):
                if current is None:
                    steps.append(Step(account_id, 1, envelope.position, fields={"balance": 0}))
                    heads[account_id] = (1, 0)
                    results.append(ApplyResult.applied(None))
                else:
                    results.append(ApplyResult.duplicate(current[0]))
                continue
            if current is None:
                results.append(ApplyResult.gap(None))
                continue
            stored, balance = current
            if stored >= envelope.version:
                results.append(ApplyResult.duplicate(stored))
                continue
            if stored != envelope.version - 1:
                results.append(ApplyResult.gap(stored))
                continue
            if moved is not None:
                balance += moved.amount
                entries.append(entry_document(envelope, moved, balance))
            steps.append(
                Step(account_id, envelope.version, envelope.position, update=_head_update(moved))
            )
            heads[account_id] = (envelope.version, balance)
            results.append(ApplyResult.applied(stored))
        # Entries before heads, as one by one; an entry already there has the same content.
        await insert_ignoring_duplicates(self._entries, entries)
        await write_steps(self._heads.collection, steps)
        return results

    async def _read_heads(self, envelopes: Sequence[EventEnvelope]) -> dict[str, tuple[int, int]]:
        ids = list(dict.fromkeys(str(envelope.aggregate_id) for envelope in envelopes))
        return {
            str(doc["_id"]): (int(doc["version"]), int(doc["balance"]))
            async for doc in self._heads.collection.find(
                {"_id": {"$in": ids}}, {"version": 1, "balance": 1}
            )
        }

    async def apply_batch(self, envelopes: Sequence[EventEnvelope]) -> None:
        mine = [envelope for envelope in envelopes if self.handles(envelope)]
        if not mine:
            return
        heads = await self._read_heads(mine)
        entries: list[Document] = []
        steps: list[Step] = []
        for envelope in mine:
            account_id = str(envelope.aggregate_id)
            try:
                event = event_data(EVENT_TYPES[envelope.type], envelope)
                moved = None if isinstance(event, AccountOpened) else movement(event)
            except InvalidEvent as e:
                log.warning(
                    "replayed_event_not_applicable", position=envelope.position, reason=str(e)
                )
                continue
            current = heads.get(account_id)
            if isinstance(event, AccountOpened):
                if current is None and envelope.version == 1:
                    steps.append(Step(account_id, 1, envelope.position, fields={"balance": 0}))
                    heads[account_id] = (1, 0)
                continue
            if current is None or current[0] != envelope.version - 1:
                continue  # already there, or after a gap: one by one it changes nothing either
            balance = current[1] + (moved.amount if moved is not None else 0)
            if moved is not None:
                entries.append(entry_document(envelope, moved, balance))
            steps.append(
                Step(account_id, envelope.version, envelope.position, update=_head_update(moved))
            )
            heads[account_id] = (envelope.version, balance)
        # Entries before heads, as one by one; an entry already there has the same content.
        await insert_ignoring_duplicates(self._entries, entries)
        await write_steps(self._heads.collection, steps)


class TransactionsReadModel:
    """Transaction history per account, newest first."""

    name: Final = NAME
    collections: Final = (ENTRIES, HEADS)
    aggregate_types: Final = frozenset({ACCOUNT})
    version_collection: Final = HEADS

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == ACCOUNT and envelope.type in EVENT_TYPES

    def indexes(self) -> Mapping[str, Sequence[IndexModel]]:
        return {ENTRIES: [IndexModel([("account_id", 1), ("version", -1)], name="account_version")]}

    def bind(self, collections: Mapping[str, AsyncCollection[Document]]) -> TransactionsProjection:
        return TransactionsProjection(collections[ENTRIES], collections[HEADS])

    def versions(self, document: Document) -> dict[str, int]:
        return {str(document["_id"]): int(document["version"])}
