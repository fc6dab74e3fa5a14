"""The per-owner summary: an owner's accounts and the total balance per currency.

Two collections per generation:

- `owner_summaries`: one document per owner, `_id` = owner id, with `owner_id`,
  `accounts.<account id>` = `{currency, balance, status, version, last_position, opened_at}`,
  `totals.<currency>` = `{balance, accounts}` and `updated_at`;
- `owner_summary_accounts`: account id -> `owner_id`, `currency`, written at the opening,
  because the later events of an account do not name its owner.

Exactly once across aggregates: the owner document carries every account's version, and each
update is filtered on `accounts.<id>.version == version - 1`, so the check and the write are one
atomic single-document update; events of different accounts of one owner touch different fields.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Final

import structlog
from pymongo import IndexModel, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from query_service.adapters.mongo import Document
from query_service.projections.base import ApplyResult, InvalidEvent, event_data
from query_service.projections.bulk import (
    apply_update,
    consecutive_runs,
    insert_ignoring_duplicates,
    merge_all,
    write_all_or_report,
)
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

NAME: Final = "owner_summaries"
SUMMARIES: Final = "owner_summaries"
ACCOUNT_OWNERS: Final = "owner_summary_accounts"
# Owner and currency never change once an account is opened, so they can be remembered.
OWNER_CACHE_SIZE = 100_000

EVENT_TYPES: Final[dict[str, type[Event]]] = {e.type_name(): e for e in ACCOUNT_EVENTS}

Owner = tuple[str, str]  # owner id, currency


def opening_update(event: AccountOpened, envelope: EventEnvelope) -> dict[str, Any]:
    account_id = str(envelope.aggregate_id)
    currency = event.currency
    return {
        "$set": {
            f"accounts.{account_id}": {
                "currency": currency,
                "balance": 0,
                "status": "open",
                "version": envelope.version,
                "last_position": envelope.position,
                "opened_at": envelope.recorded_at,
            }
        },
        "$inc": {f"totals.{currency}.accounts": 1, f"totals.{currency}.balance": 0},
        "$max": {"updated_at": envelope.recorded_at},
    }


def summary_update(event: Event, envelope: EventEnvelope, currency: str) -> dict[str, Any]:
    """The update one later account event makes to its owner's summary."""
    prefix = f"accounts.{envelope.aggregate_id}"
    changes: dict[str, Any] = {
        "$set": {
            f"{prefix}.version": envelope.version,
            f"{prefix}.last_position": envelope.position,
        },
        "$max": {"updated_at": envelope.recorded_at},
    }
    delta = 0
    match event:
        case (
            MoneyDeposited(amount=amount)
            | MoneyCreditedFromTransfer(amount=amount)
            | TransferDebitRefunded(amount=amount)
        ):
            delta = _positive(amount)
        case MoneyWithdrawn(amount=amount) | MoneyDebitedForTransfer(amount=amount):
            delta = -_positive(amount)
        case TransferDebitSettled():
            pass
        case AccountFrozen():
            changes["$set"][f"{prefix}.status"] = "frozen"
        case AccountUnfrozen():
            changes["$set"][f"{prefix}.status"] = "open"
        case AccountClosed():
            changes["$set"][f"{prefix}.status"] = "closed"
        case _:
            raise InvalidEvent(f"{event.type_name()} does not change an existing account")
    if delta:
        changes["$inc"] = {f"{prefix}.balance": delta, f"totals.{currency}.balance": delta}
    return changes


def _positive(amount: int) -> int:
    if amount <= 0:
        raise InvalidEvent(f"amount must be positive, got {amount}")
    return amount


class OwnerCache:
    """A bounded memory of account -> (owner, currency), shared by all generations."""

    def __init__(self, size: int = OWNER_CACHE_SIZE) -> None:
        self._size = size
        self._owners: OrderedDict[str, Owner] = OrderedDict()

    def get(self, account_id: str) -> Owner | None:
        found = self._owners.get(account_id)
        if found is not None:
            self._owners.move_to_end(account_id)
        return found

    def put(self, account_id: str, owner: Owner) -> None:
        self._owners[account_id] = owner
        self._owners.move_to_end(account_id)
        while len(self._owners) > self._size:
            self._owners.popitem(last=False)


class OwnerSummariesProjection:
    """Projects account events into their owner's summary."""

    name: Final = NAME

    def __init__(
        self,
        summaries: AsyncCollection[Document],
        account_owners: AsyncCollection[Document],
        cache: OwnerCache,
    ) -> None:
        self._summaries = summaries
        self._account_owners = account_owners
        self._cache = cache

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == ACCOUNT and envelope.type in EVENT_TYPES

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        event = event_data(EVENT_TYPES[envelope.type], envelope)
        account_id = str(envelope.aggregate_id)
        if isinstance(event, AccountOpened):
            return await self._open(event, envelope)
        owner = await self._owner_of(account_id)
        if owner is None:
            return ApplyResult.gap(None)
        owner_id, currency = owner
        result = await self._summaries.update_one(
            {"_id": owner_id, f"accounts.{account_id}.version": envelope.version - 1},
            summary_update(event, envelope, currency),
        )
        if result.matched_count == 1:
            return ApplyResult.applied(envelope.version - 1)
        stored = await self._version_of(owner_id, account_id)
        if stored is not None and stored >= envelope.version:
            return ApplyResult.duplicate(stored)
        return ApplyResult.gap(stored)

    async def _open(self, event: AccountOpened, envelope: EventEnvelope) -> ApplyResult:
        if envelope.version != 1:
            raise InvalidEvent(f"a creating event must have version 1, not {envelope.version}")
        account_id = str(envelope.aggregate_id)
        try:
            await self._account_owners.insert_one(
                {"_id": account_id, "owner_id": event.owner_id, "currency": event.currency}
            )
            owner: Owner | None = (event.owner_id, event.currency)
        except DuplicateKeyError:
            owner = await self._stored_owner(account_id)
        if owner is None or owner != (event.owner_id, event.currency):
            # A second opening of the same account with other data: the first one stands.
            return ApplyResult.duplicate(1)
        self._cache.put(account_id, owner)
        update = opening_update(event, envelope)
        update["$setOnInsert"] = {"owner_id": event.owner_id}
        query = {"_id": event.owner_id, f"accounts.{account_id}": {"$exists": False}}
        for attempt in (1, 2):
            try:
                await self._summaries.update_one(query, update, upsert=True)
            except DuplicateKeyError:
                # Either the account is there (a duplicate), or another account of a new
                # owner created the document first: then the second try updates it.
                if attempt == 2 or await self._version_of(event.owner_id, account_id) is not None:
                    return ApplyResult.duplicate(await self._version_of(event.owner_id, account_id))
                continue
            return ApplyResult.applied(None)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _owner_of(self, account_id: str) -> Owner | None:
        owner = self._cache.get(account_id)
        if owner is None:
            owner = await self._stored_owner(account_id)
            if owner is not None:
                self._cache.put(account_id, owner)
        return owner

    async def _stored_owner(self, account_id: str) -> Owner | None:
        found = await self._account_owners.find_one({"_id": account_id})
        return None if found is None else (str(found["owner_id"]), str(found["currency"]))

    async def _version_of(self, owner_id: str, account_id: str) -> int | None:
        found = await self._summaries.find_one(
            {"_id": owner_id}, {f"accounts.{account_id}.version": 1}
        )
        entry = (found or {}).get("accounts", {}).get(account_id)
        return None if entry is None else int(entry["version"])

    async def apply_batch(self, envelopes: Sequence[EventEnvelope]) -> None:
        mine = [envelope for envelope in envelopes if self.handles(envelope)]
        if not mine:
            return
        owners = await self._owners_for(mine)
        changes: list[tuple[EventEnvelope, Event, Owner]] = []
        for envelope in mine:
            account_id = str(envelope.aggregate_id)
            try:
                event = event_data(EVENT_TYPES[envelope.type], envelope)
                if isinstance(event, AccountOpened):
                    if envelope.version != 1:
                        raise InvalidEvent(
                            f"a creating event must have version 1, not {envelope.version}"
                        )
                    owner = owners.setdefault(account_id, (event.owner_id, event.currency))
                    if owner != (event.owner_id, event.currency):
                        continue  # a second opening with other data: the first one stands
                elif account_id not in owners:
                    continue  # not opened: one by one it finds a gap
                else:
                    owner = owners[account_id]
                    summary_update(event, envelope, owner[1])  # raises for an impossible event
            except InvalidEvent as e:
                log.warning(
                    "replayed_event_not_applicable", position=envelope.position, reason=str(e)
                )
                continue
            changes.append((envelope, event, owner))
        await insert_ignoring_duplicates(
            self._account_owners,
            [
                {"_id": str(envelope.aggregate_id), "owner_id": owner[0], "currency": owner[1]}
                for envelope, event, owner in changes
                if isinstance(event, AccountOpened)
            ],
        )
        new_owners, folded = _fold_per_owner(changes)
        if new_owners:
            await self._summaries.bulk_write(
                [
                    UpdateOne({"_id": owner}, {"$setOnInsert": {"owner_id": owner}}, upsert=True)
                    for owner in new_owners
                ],
                ordered=False,
            )
        if not await write_all_or_report(self._summaries, [], folded):
            await self._summaries.bulk_write(_per_event_ops(changes), ordered=True)

    async def _owners_for(self, envelopes: Sequence[EventEnvelope]) -> dict[str, Owner]:
        owners: dict[str, Owner] = {}
        unknown = set()
        for envelope in envelopes:
            account_id = str(envelope.aggregate_id)
            cached = self._cache.get(account_id)
            if cached is not None:
                owners[account_id] = cached
            elif envelope.type != AccountOpened.type_name():
                unknown.add(account_id)
        if unknown:
            async for doc in self._account_owners.find({"_id": {"$in": list(unknown)}}):
                owners[str(doc["_id"])] = (str(doc["owner_id"]), str(doc["currency"]))
        return owners


Change = tuple[EventEnvelope, Event, Owner]


def _per_event_ops(changes: Sequence[Change]) -> list[UpdateOne]:
    """Each event as its own guarded update, in order: what applying them one by one writes."""
    ops: list[UpdateOne] = []
    for envelope, event, (owner_id, currency) in changes:
        account_id = str(envelope.aggregate_id)
        if isinstance(event, AccountOpened):
            ops.append(
                UpdateOne({"_id": owner_id}, {"$setOnInsert": {"owner_id": owner_id}}, upsert=True)
            )
            ops.append(
                UpdateOne(
                    {"_id": owner_id, f"accounts.{account_id}": {"$exists": False}},
                    opening_update(event, envelope),
                )
            )
        else:
            ops.append(
                UpdateOne(
                    {"_id": owner_id, f"accounts.{account_id}.version": envelope.version - 1},
                    summary_update(event, envelope, currency),
                )
            )
    return ops


def _fold_per_owner(changes: Sequence[Change]) -> tuple[set[str], list[UpdateOne]]:
    """One update per owner with the effect of all its changes, guarded per account.

    Returns the owners whose document may need creating first, and the updates.
    """
    guards: dict[str, dict[str, Any]] = {}
    updates: dict[str, list[dict[str, Any]]] = {}
    new_owners: set[str] = set()
    runs = consecutive_runs(changes, lambda c: (str(c[0].aggregate_id), c[0].version))
    for account_id, run in runs.items():
        if not run:
            continue
        first, first_event, (owner_id, currency) = run[0]
        if isinstance(first_event, AccountOpened):
            # Build the account's entry in memory: $set of a whole entry and $inc of one of its
            # fields cannot go in one update.
            scratch = apply_update({}, opening_update(first_event, first))
            for envelope, event, _ in run[1:]:
                scratch = apply_update(scratch, summary_update(event, envelope, currency))
            guards.setdefault(owner_id, {})[f"accounts.{account_id}"] = {"$exists": False}
            updates.setdefault(owner_id, []).append(
                {
                    "$set": {f"accounts.{account_id}": scratch["accounts"][account_id]},
                    "$inc": {
                        f"totals.{currency}.accounts": 1,
                        f"totals.{currency}.balance": scratch["totals"][currency]["balance"],
                    },
                    "$max": {"updated_at": scratch["updated_at"]},
                }
            )
            new_owners.add(owner_id)
        else:
            guards.setdefault(owner_id, {})[f"accounts.{account_id}.version"] = first.version - 1
            updates.setdefault(owner_id, []).extend(
                summary_update(event, envelope, currency) for envelope, event, _ in run
            )
    return new_owners, [
        UpdateOne({"_id": owner_id, **guards[owner_id]}, merge_all(parts))
        for owner_id, parts in updates.items()
    ]


class OwnerSummariesReadModel:
    """Per-owner summary: accounts and total balance per currency."""

    name: Final = NAME
    collections: Final = (SUMMARIES, ACCOUNT_OWNERS)
    aggregate_types: Final = frozenset({ACCOUNT})
    version_collection: Final = SUMMARIES

    def __init__(self) -> None:
        self._cache = OwnerCache()

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == ACCOUNT and envelope.type in EVENT_TYPES

    def indexes(self) -> Mapping[str, Sequence[IndexModel]]:
        return {}  # both read by `_id` only

    def bind(
        self, collections: Mapping[str, AsyncCollection[Document]]
    ) -> OwnerSummariesProjection:
        return OwnerSummariesProjection(
            collections[SUMMARIES], collections[ACCOUNT_OWNERS], self._cache
        )

    def versions(self, document: Document) -> dict[str, int]:
        accounts: dict[str, Any] = document.get("accounts", {})
        return {account_id: int(entry["version"]) for account_id, entry in accounts.items()}
