"""The account projection's pure parts: which events it takes and what each does to a document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast
from uuid import uuid4

import pytest

from query_service.domains.ledger.accounts import (
    AccountsProjection,
    account_update,
    opened_account,
)
from query_service.projections.base import InvalidEvent, event_data
from query_service.projections.store import VersionedCollection
from shared.ledger import (
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
from tests.query_support import envelope

AT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


class TestAccountUpdate:
    def test_deposit_increments_the_balance(self) -> None:
        assert account_update(MoneyDeposited(amount=250), AT) == {
            "$set": {"updated_at": AT},
            "$inc": {"balance": 250},
        }

    def test_withdrawal_decrements_the_balance(self) -> None:
        assert account_update(MoneyWithdrawn(amount=70), AT)["$inc"] == {"balance": -70}

    @pytest.mark.parametrize(
        ("event", "status"),
        [(AccountFrozen(), "frozen"), (AccountUnfrozen(), "open"), (AccountClosed(), "closed")],
    )
    def test_status_events_set_the_status(
        self, event: AccountFrozen | AccountUnfrozen | AccountClosed, status: str
    ) -> None:
        update = account_update(event, AT)
        assert update == {"$set": {"updated_at": AT, "status": status}}

    @pytest.mark.parametrize("amount", [0, -5])
    def test_rejects_a_non_positive_amount(self, amount: int) -> None:
        with pytest.raises(InvalidEvent, match="positive"):
            account_update(MoneyDeposited(amount=amount), AT)
        with pytest.raises(InvalidEvent, match="positive"):
            account_update(MoneyWithdrawn(amount=amount), AT)

    def test_transfer_legs_move_the_balance(self) -> None:
        transfer, other = uuid4(), uuid4()
        debit = MoneyDebitedForTransfer(
            transfer_id=transfer, amount=30, currency="EUR", to_account_id=other
        )
        credit = MoneyCreditedFromTransfer(transfer_id=transfer, amount=30, from_account_id=other)
        refund = TransferDebitRefunded(transfer_id=transfer, amount=30, code="c", reason="r")
        assert account_update(debit, AT)["$inc"] == {"balance": -30}
        assert account_update(credit, AT)["$inc"] == {"balance": 30}
        assert account_update(refund, AT)["$inc"] == {"balance": 30}
        assert account_update(TransferDebitSettled(transfer_id=transfer), AT) == {
            "$set": {"updated_at": AT}
        }

    def test_an_opening_is_not_an_update(self) -> None:
        with pytest.raises(InvalidEvent, match="AccountOpened"):
            account_update(AccountOpened(owner_id="alice", currency="EUR"), AT)


def test_an_opened_account_starts_open_and_empty() -> None:
    account_id = uuid4()
    opening = envelope(account_id, 1, AccountOpened(owner_id="bob", currency="CHF"))
    fields = opened_account(AccountOpened(owner_id="bob", currency="CHF"), opening)
    assert fields == {
        "id": str(account_id),
        "owner_id": "bob",
        "currency": "CHF",
        "balance": 0,
        "status": "open",
        "opened_at": opening.recorded_at,
        "updated_at": opening.recorded_at,
    }


def _projection() -> AccountsProjection:
    # `handles` looks at the envelope only; the store is never touched.
    return AccountsProjection(cast(VersionedCollection, object()))


class TestHandles:
    def test_takes_every_account_event(self) -> None:
        projection = _projection()
        for event in (
            AccountOpened(owner_id="a", currency="EUR"),
            MoneyDeposited(amount=1),
            MoneyWithdrawn(amount=1),
            AccountFrozen(),
            AccountUnfrozen(),
            AccountClosed(),
        ):
            assert projection.handles(envelope(uuid4(), 1, event))

    def test_ignores_other_aggregates_and_unknown_types(self) -> None:
        projection = _projection()
        deposit = MoneyDeposited(amount=1)
        assert not projection.handles(envelope(uuid4(), 1, deposit, aggregate_type="transfer"))
        assert not projection.handles(envelope(uuid4(), 1, deposit, event_type="AccountRenamed"))


def test_event_data_names_the_bad_field() -> None:
    bad = envelope(uuid4(), 2, MoneyDeposited(amount=1)).model_copy(
        update={"data": {"amount": "lots"}}
    )
    with pytest.raises(InvalidEvent, match=r"MoneyDeposited data .* amount"):
        event_data(MoneyDeposited, bad)


def test_event_data_rejects_unknown_fields() -> None:
    bad = envelope(uuid4(), 2, MoneyDeposited(amount=1)).model_copy(
        update={"data": {"amount": 1, "note": "x"}}
    )
    with pytest.raises(InvalidEvent, match="note"):
        event_data(MoneyDeposited, bad)
