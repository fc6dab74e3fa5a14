"""The per-owner summary: an owner's accounts, page by page, and its total balance per currency.

One collection per generation, `owner_accounts`: one document per account, `_id` = account id,
with `owner_id`, `currency`, `balance`, `status` (`open` | `frozen` | `closed`), `version`,
`last_position`, `opened_at` and `updated_at`. Each is written like every one-document-per-
aggregate read model (`DocumentProjection`): an event is applied only at the account's next
version, in one single-document update, so a redelivery or a replay changes nothing twice. The
index on (`owner_id`, `_id`) serves the pages of an owner's accounts in account-id order and
the totals, which are summed per currency when they are read (see `views.owner_summary`).

Why not one document per owner, as before: it held every account of its owner, so it grew
without bound (MongoDB refuses a document past 16 MiB, about 10^5 accounts) and every event
rewrote it; and totals kept apart from the accounts would be a second write, whose loss in a
crash between the two writes would make them drift for good. Nothing here grows with the number
of accounts an owner has; a summary read costs a pass over that owner's documents instead.

Upgrading from that shape (`owner_summaries`, one document per owner, and
`owner_summary_accounts`, account -> owner): the new collection has another name, so old and new
documents never mix, and `cqrs rebuild owner_summaries` fills a generation in the new shape,
switches to it and drops the old one with both its collections (they stay listed here for that).
Until then, the generation the older version wrote knows the accounts opened since the upgrade
only; see `OwnerSummariesProjection`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import structlog
from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from query_service.domains.ledger.accounts import account_update
from query_service.projections.base import Applied, ApplyResult, ApplyStatus
from query_service.projections.document import DocumentProjection, DocumentReadModel, DocumentRules
from query_service.projections.store import Document, VersionedCollection
from shared.ledger import ACCOUNT, ACCOUNT_EVENTS, AccountOpened
from shared.messages import EventEnvelope

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

NAME: Final = "owner_summaries"
ACCOUNTS: Final = "owner_accounts"
# The shape before: one document per owner, and account -> owner.
LEGACY_SUMMARIES: Final = "owner_summaries"
LEGACY_ACCOUNT_OWNERS: Final = "owner_summary_accounts"


def opened_entry(event: AccountOpened, envelope: EventEnvelope) -> dict[str, Any]:
    """An account's document in its owner's summary, as it is opened."""
    return {
        "owner_id": event.owner_id,
        "currency": event.currency,
        "balance": 0,
        "status": "open",
        "opened_at": envelope.recorded_at,
        "updated_at": envelope.recorded_at,
    }


RULES: Final = DocumentRules(
    name=NAME,
    collection=ACCOUNTS,
    aggregate_type=ACCOUNT,
    events=ACCOUNT_EVENTS,
    creating=AccountOpened,
    created=opened_entry,
    # An event changes balance and status here exactly as in the account's own read model.
    updated=lambda event, envelope: account_update(event, envelope.recorded_at),
    # An owner's accounts in id order, and the totals' match on the owner.
    indexes=(IndexModel([("owner_id", 1), ("_id", 1)], name="owner_id"),),
)


class OwnerSummariesProjection(DocumentProjection[AccountOpened]):
    """Projects account events into their account's document in the owner summaries.

    In a generation that an older version wrote (one document per owner), an account opened
    before the upgrade has no document of its own, so each of its later events would wait as a
    gap and then be parked, holding its partition back each time. Such an event is acknowledged
    without effect instead (reported as a duplicate): that generation is incomplete until the
    rebuild the upgrade calls for replaces it, and the event stays in the event store for it.
    """

    def __init__(
        self, documents: VersionedCollection, legacy_account_owners: AsyncCollection[Document]
    ) -> None:
        super().__init__(RULES, documents)
        self._legacy_account_owners = legacy_account_owners
        self._warned = False

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        result = await super().apply(envelope)
        if result.status is not ApplyStatus.GAP or result.stored_version is not None:
            return result
        account_id = str(envelope.aggregate_id)
        if await self._legacy_account_owners.find_one({"_id": account_id}, {"_id": 1}) is None:
            return result
        self._warn(account_id)
        return ApplyResult.duplicate(None)

    async def apply_many(self, envelopes: Sequence[EventEnvelope]) -> list[Applied]:
        results = await super().apply_many(envelopes)
        unknown = {
            str(envelope.aggregate_id)
            for envelope, result in zip(envelopes, results, strict=True)
            if isinstance(result, ApplyResult)
            and result.status is ApplyStatus.GAP
            and result.stored_version is None
        }
        if not unknown:
            return results
        legacy = {
            str(found["_id"])
            async for found in self._legacy_account_owners.find(
                {"_id": {"$in": sorted(unknown)}}, {"_id": 1}
            )
        }
        if not legacy:
            return results
        self._warn(min(legacy))
        return [
            ApplyResult.duplicate(None)
            if isinstance(result, ApplyResult)
            and result.status is ApplyStatus.GAP
            and str(envelope.aggregate_id) in legacy
            else result
            for envelope, result in zip(envelopes, results, strict=True)
        ]

    def _warn(self, account_id: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "owner_summaries_need_rebuild",
                collection=self._legacy_account_owners.name,
                account_id=account_id,
                action="cqrs rebuild owner_summaries",
            )


class OwnerSummariesReadModel(DocumentReadModel[AccountOpened]):
    """Per-owner summary: the owner's accounts, one document each, summed per currency at read."""

    def __init__(self) -> None:
        super().__init__(RULES)

    @property
    def collections(self) -> tuple[str, ...]:
        # The shape before is listed so that a rebuild drops it with its generation.
        return (ACCOUNTS, LEGACY_SUMMARIES, LEGACY_ACCOUNT_OWNERS)

    def bind(
        self, collections: Mapping[str, AsyncCollection[Document]]
    ) -> OwnerSummariesProjection:
        return OwnerSummariesProjection(
            VersionedCollection(collections[ACCOUNTS]), collections[LEGACY_ACCOUNT_OWNERS]
        )
