"""Transfers: the aggregate, the account steps, and the process manager's reactions."""

from __future__ import annotations

import uuid

from command_service.domains.ledger.account import Account
from command_service.domains.ledger.transfer import Transfer, TransferProcess
from command_service.model.process import IssuedCommand
from command_service.testing import scenario
from shared.ledger import (
    MAX_BALANCE,
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    CloseAccount,
    CompleteTransfer,
    CreditFromTransfer,
    DebitForTransfer,
    DepositMoney,
    FailTransfer,
    MoneyCreditedFromTransfer,
    MoneyDebitedForTransfer,
    MoneyDeposited,
    RefundTransferDebit,
    RequestTransfer,
    SettleTransferDebit,
    TransferCompleted,
    TransferDebitRefunded,
    TransferDebitSettled,
    TransferFailed,
    TransferRequested,
)
from shared.messages import ReplyError

T, A, B = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
OPENED = AccountOpened(owner_id="o", currency="EUR")
REQUESTED = TransferRequested(from_account_id=A, to_account_id=B, amount=30)
DEBITED = MoneyDebitedForTransfer(transfer_id=T, amount=30, currency="EUR", to_account_id=B)


class TestTransferAggregate:
    def test_request_starts_a_pending_transfer(self) -> None:
        transfer = (
            scenario(Transfer)
            .when(RequestTransfer(from_account_id=A, to_account_id=B, amount=30))
            .then(REQUESTED)
        )
        assert transfer.status == "pending"

    def test_completes_once(self) -> None:
        scenario(Transfer).given(REQUESTED).when(CompleteTransfer()).then(TransferCompleted())
        scenario(Transfer).given(REQUESTED, TransferCompleted()).when(
            FailTransfer(code="x", reason="y")
        ).then_rejects("transfer_not_pending")


class TestAccountSteps:
    def test_debit_holds_the_money_as_pending(self) -> None:
        account = (
            scenario(Account)
            .given(OPENED, MoneyDeposited(amount=100))
            .when(DebitForTransfer(transfer_id=T, amount=30, to_account_id=B))
            .then(DEBITED)
        )
        assert account.balance == 70
        assert account.pending_debits == {T: 30}

    def test_debit_beyond_balance_is_refused(self) -> None:
        scenario(Account).given(OPENED, MoneyDeposited(amount=10)).when(
            DebitForTransfer(transfer_id=T, amount=30, to_account_id=B)
        ).then_rejects("insufficient_funds")

    def test_credit_in_another_currency_is_refused(self) -> None:
        scenario(Account).given(AccountOpened(owner_id="o", currency="USD")).when(
            CreditFromTransfer(transfer_id=T, amount=30, currency="EUR", from_account_id=A)
        ).then_rejects("currency_mismatch")

    def test_refund_lands_even_on_a_frozen_account(self) -> None:
        account = (
            scenario(Account)
            .given(OPENED, MoneyDeposited(amount=30), DEBITED, AccountFrozen())
            .when(RefundTransferDebit(transfer_id=T, amount=30, code="c", reason="r"))
            .then(TransferDebitRefunded(transfer_id=T, amount=30, code="c", reason="r"))
        )
        assert account.balance == 30
        assert account.pending_debits == {}

    def test_refund_without_pending_debit_is_refused(self) -> None:
        scenario(Account).given(OPENED).when(
            RefundTransferDebit(transfer_id=T, amount=30, code="c", reason="r")
        ).then_rejects("no_pending_debit")

    def test_account_with_a_pending_debit_cannot_close(self) -> None:
        scenario(Account).given(OPENED, MoneyDeposited(amount=30), DEBITED).when(
            CloseAccount()
        ).then_rejects("transfer_pending")

    def test_settled_debit_lets_the_account_close(self) -> None:
        account = (
            scenario(Account)
            .given(OPENED, MoneyDeposited(amount=30), DEBITED)
            .when(SettleTransferDebit(transfer_id=T))
            .then(TransferDebitSettled(transfer_id=T))
        )
        assert account.pending_debits == {}
        assert account.balance == 0
        scenario(Account).given(
            OPENED, MoneyDeposited(amount=30), DEBITED, TransferDebitSettled(transfer_id=T)
        ).when(CloseAccount()).then(AccountClosed())


def commands(
    steps: list[IssuedCommand] | tuple[IssuedCommand, ...],
) -> list[tuple[uuid.UUID, object]]:
    return [(step.aggregate_id, step.command) for step in steps]


class TestTransferProcess:
    process = TransferProcess()

    def test_request_debits_the_source(self) -> None:
        [debit] = self.process.react(REQUESTED, T)
        assert (debit.aggregate_id, debit.command) == (
            A,
            DebitForTransfer(transfer_id=T, amount=30, to_account_id=B),
        )

    def test_refused_debit_fails_the_transfer(self) -> None:
        [debit] = self.process.react(REQUESTED, T)
        assert debit.on_rejected is not None
        [fail] = debit.on_rejected(ReplyError(code="insufficient_funds", message="m"))
        assert fail.aggregate_id == T
        assert isinstance(fail.command, FailTransfer)
        assert fail.command.code == "insufficient_funds"

    def test_debit_credits_the_target_and_refused_credit_refunds(self) -> None:
        [credit] = self.process.react(DEBITED, A)
        assert (credit.aggregate_id, credit.command) == (
            B,
            CreditFromTransfer(transfer_id=T, amount=30, currency="EUR", from_account_id=A),
        )
        assert credit.on_rejected is not None
        [refund] = credit.on_rejected(ReplyError(code="account_closed", message="closed"))
        assert refund.aggregate_id == A
        assert isinstance(refund.command, RefundTransferDebit)
        assert (refund.command.amount, refund.command.code) == (30, "account_closed")

    def test_credit_settles_and_completes(self) -> None:
        steps = self.process.react(
            MoneyCreditedFromTransfer(transfer_id=T, amount=30, from_account_id=A), B
        )
        assert commands(list(steps)) == [
            (A, SettleTransferDebit(transfer_id=T)),
            (T, CompleteTransfer()),
        ]

    def test_refund_fails_the_transfer_with_the_reason(self) -> None:
        [fail] = self.process.react(
            TransferDebitRefunded(transfer_id=T, amount=30, code="account_frozen", reason="r"),
            A,
        )
        assert (fail.aggregate_id, fail.command) == (
            T,
            FailTransfer(code="account_frozen", reason="r"),
        )

    def test_the_same_event_issues_the_same_command_ids(self) -> None:
        first = [s.command_id for s in self.process.react(REQUESTED, T)]
        again = [s.command_id for s in TransferProcess().react(REQUESTED, T)]
        assert first == again

    def test_ignores_unrelated_events(self) -> None:
        assert self.process.react(TransferCompleted(), T) == []
        assert self.process.react(TransferFailed(code="c", reason="r"), T) == []


class TestBalanceLimitWithHeldMoney:
    """A refund always lands, so money held for a pending debit keeps its room under the
    balance limit: a refund can never take the balance above `MAX_BALANCE`."""

    FULL = (
        AccountOpened(owner_id="alice", currency="EUR"),
        MoneyDeposited(amount=MAX_BALANCE),
        DEBITED,
    )

    def test_a_deposit_may_not_use_the_room_of_money_held_for_a_transfer(self) -> None:
        scenario(Account).given(*self.FULL).when(DepositMoney(amount=30)).then_rejects(
            "balance_limit_exceeded"
        )

    def test_a_credit_may_not_use_it_either(self) -> None:
        scenario(Account).given(*self.FULL).when(
            CreditFromTransfer(
                transfer_id=uuid.uuid4(), amount=1, currency="EUR", from_account_id=B
            )
        ).then_rejects("balance_limit_exceeded")

    def test_the_refund_then_fits_under_the_limit(self) -> None:
        account = (
            scenario(Account)
            .given(*self.FULL)
            .when(RefundTransferDebit(transfer_id=T, amount=30, code="c", reason="r"))
            .then(TransferDebitRefunded(transfer_id=T, amount=30, code="c", reason="r"))
        )
        assert account.balance == MAX_BALANCE

    def test_once_settled_the_room_is_free_again(self) -> None:
        scenario(Account).given(*self.FULL, TransferDebitSettled(transfer_id=T)).when(
            DepositMoney(amount=30)
        ).then(MoneyDeposited(amount=30))

    def test_held_amounts_survive_a_snapshot(self) -> None:
        account = Account.rehydrate(A, self.FULL)
        restored = Account.from_snapshot(account.id, account.version, account.snapshot_state())
        assert restored.pending_debits == {T: 30}
