"""The ledger account's rules, as given/when/then scenarios."""

from __future__ import annotations

import pytest

from command_service.domains.ledger.account import Account
from command_service.testing import ScenarioFailedError, scenario
from shared.ledger import (
    MAX_BALANCE,
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    CloseAccount,
    DepositMoney,
    FreezeAccount,
    MoneyDeposited,
    MoneyWithdrawn,
    OpenAccount,
    UnfreezeAccount,
    WithdrawMoney,
)

OPENED = AccountOpened(owner_id="alice", currency="EUR")


class TestOpening:
    def test_opens_without_deposit(self) -> None:
        account = scenario(Account).when(OpenAccount(owner_id="alice", currency="EUR")).then(OPENED)
        assert (account.status, account.balance, account.version) == ("open", 0, 1)

    def test_opening_deposit_is_a_separate_event(self) -> None:
        account = (
            scenario(Account)
            .when(OpenAccount(owner_id="alice", currency="EUR", initial_deposit=500))
            .then(OPENED, MoneyDeposited(amount=500))
        )
        assert (account.balance, account.version) == (500, 2)

    def test_rejects_opening_twice(self) -> None:
        scenario(Account).given(OPENED).when(
            OpenAccount(owner_id="bob", currency="USD")
        ).then_rejects("account_exists")


class TestMovingMoney:
    def test_deposit_adds_to_balance(self) -> None:
        account = (
            scenario(Account)
            .given(OPENED, MoneyDeposited(amount=10))
            .when(DepositMoney(amount=5))
            .then(MoneyDeposited(amount=5))
        )
        assert account.balance == 15

    def test_withdrawal_of_whole_balance(self) -> None:
        account = (
            scenario(Account)
            .given(OPENED, MoneyDeposited(amount=10))
            .when(WithdrawMoney(amount=10))
            .then(MoneyWithdrawn(amount=10))
        )
        assert account.balance == 0

    def test_rejects_withdrawal_beyond_balance(self) -> None:
        scenario(Account).given(OPENED, MoneyDeposited(amount=10)).when(
            WithdrawMoney(amount=11)
        ).then_rejects("insufficient_funds")

    def test_rejects_deposit_to_unknown_account(self) -> None:
        scenario(Account).when(DepositMoney(amount=1)).then_rejects("account_not_found")

    def test_rejects_currency_mismatch(self) -> None:
        scenario(Account).given(OPENED).when(DepositMoney(amount=1, currency="USD")).then_rejects(
            "currency_mismatch"
        )

    def test_accepts_matching_currency(self) -> None:
        scenario(Account).given(OPENED).when(DepositMoney(amount=1, currency="EUR")).then(
            MoneyDeposited(amount=1)
        )

    def test_rejects_deposit_beyond_balance_limit(self) -> None:
        scenario(Account).given(OPENED, MoneyDeposited(amount=MAX_BALANCE)).when(
            DepositMoney(amount=1)
        ).then_rejects("balance_limit_exceeded")


class TestFreezing:
    def test_frozen_account_refuses_deposits_and_withdrawals(self) -> None:
        frozen = (OPENED, MoneyDeposited(amount=10), AccountFrozen())
        scenario(Account).given(*frozen).when(DepositMoney(amount=1)).then_rejects("account_frozen")
        scenario(Account).given(*frozen).when(WithdrawMoney(amount=1)).then_rejects(
            "account_frozen"
        )

    def test_unfreeze_restores_movements(self) -> None:
        account = (
            scenario(Account)
            .given(OPENED, AccountFrozen())
            .when(UnfreezeAccount())
            .then(AccountUnfrozen())
        )
        assert account.status == "open"

    def test_rejects_unfreezing_an_open_account(self) -> None:
        scenario(Account).given(OPENED).when(UnfreezeAccount()).then_rejects("account_open")

    def test_freeze(self) -> None:
        scenario(Account).given(OPENED).when(FreezeAccount()).then(AccountFrozen())


class TestClosing:
    def test_closes_at_zero_balance(self) -> None:
        account = scenario(Account).given(OPENED).when(CloseAccount()).then(AccountClosed())
        assert account.status == "closed"

    def test_rejects_closing_with_money_left(self) -> None:
        scenario(Account).given(OPENED, MoneyDeposited(amount=1)).when(CloseAccount()).then_rejects(
            "balance_not_zero"
        )

    def test_closed_account_refuses_deposits(self) -> None:
        scenario(Account).given(OPENED, AccountClosed()).when(DepositMoney(amount=1)).then_rejects(
            "account_closed"
        )


class TestScenarioFixture:
    def test_fails_when_events_differ(self) -> None:
        with pytest.raises(ScenarioFailedError):
            scenario(Account).given(OPENED).when(DepositMoney(amount=1)).then(
                MoneyDeposited(amount=2)
            )

    def test_fails_when_rejection_code_differs(self) -> None:
        with pytest.raises(ScenarioFailedError):
            scenario(Account).when(DepositMoney(amount=1)).then_rejects("account_closed")
