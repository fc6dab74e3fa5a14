"""The ledger's account: open, deposit, withdraw without overdraft, freeze, close at zero."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal
from uuid import UUID

from command_service.model.aggregate import Aggregate, DomainError
from shared.ledger import (
    ACCOUNT,
    ACCOUNT_EVENTS,
    COMMANDS,
    INTERNAL_COMMANDS,
    MAX_BALANCE,
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    CloseAccount,
    CreditFromTransfer,
    DebitForTransfer,
    DepositMoney,
    FreezeAccount,
    MoneyCreditedFromTransfer,
    MoneyDebitedForTransfer,
    MoneyDeposited,
    MoneyWithdrawn,
    OpenAccount,
    RefundTransferDebit,
    SettleTransferDebit,
    TransferDebitRefunded,
    TransferDebitSettled,
    UnfreezeAccount,
    WithdrawMoney,
)
from shared.messages import Command, Event

Status = Literal["new", "open", "frozen", "closed"]


class Account(Aggregate):
    """A bank account holding an integer balance in minor units of one currency.

    Money leaving for a transfer is held as a pending debit until the transfer settles it or
    refunds it; an account with pending debits cannot close. A refund always lands (the money
    left this account, so the ledger balances only if it comes back); so that it can never take
    the balance above `MAX_BALANCE`, money held for pending debits counts as still here when a
    deposit or credit is checked against the limit: balance + held <= MAX_BALANCE holds after
    every event.
    """

    aggregate_type = ACCOUNT
    commands = tuple(c for c in COMMANDS if c.aggregate_type == ACCOUNT)
    internal_commands = tuple(c for c in INTERNAL_COMMANDS if c.aggregate_type == ACCOUNT)
    events = ACCOUNT_EVENTS
    # 2: pending debits keep their amounts (held money counts against the balance limit).
    snapshot_schema = 2

    def __init__(self, aggregate_id: UUID) -> None:
        super().__init__(aggregate_id)
        self.status: Status = "new"
        self.owner_id = ""
        self.currency = ""
        self.balance = 0
        self.pending_debits: dict[UUID, int] = {}  # transfer id -> amount held

    def snapshot_state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "owner_id": self.owner_id,
            "currency": self.currency,
            "balance": self.balance,
            "pending_debits": {str(t): amount for t, amount in sorted(self.pending_debits.items())},
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        self.status = state["status"]
        self.owner_id = state["owner_id"]
        self.currency = state["currency"]
        self.balance = state["balance"]
        self.pending_debits = {UUID(t): amount for t, amount in state["pending_debits"].items()}

    def apply(self, event: Event) -> None:
        match event:
            case AccountOpened(owner_id=owner_id, currency=currency):
                self.status, self.owner_id, self.currency = "open", owner_id, currency
            case MoneyDeposited(amount=amount):
                self.balance += amount
            case MoneyWithdrawn(amount=amount):
                self.balance -= amount
            case AccountFrozen():
                self.status = "frozen"
            case AccountUnfrozen():
                self.status = "open"
            case AccountClosed():
                self.status = "closed"
            case MoneyDebitedForTransfer(transfer_id=transfer_id, amount=amount):
                self.balance -= amount
                self.pending_debits[transfer_id] = amount
            case MoneyCreditedFromTransfer(amount=amount):
                self.balance += amount
            case TransferDebitRefunded(transfer_id=transfer_id, amount=amount):
                self.balance += amount
                self.pending_debits.pop(transfer_id, None)
            case TransferDebitSettled(transfer_id=transfer_id):
                self.pending_debits.pop(transfer_id, None)

    def decide(self, command: Command) -> Sequence[Event]:
        match command:
            case OpenAccount():
                if self.status != "new":
                    raise DomainError("account_exists", f"account {self.id} already exists")
                opened: list[Event] = [
                    AccountOpened(owner_id=command.owner_id, currency=command.currency)
                ]
                if command.initial_deposit:
                    opened.append(MoneyDeposited(amount=command.initial_deposit))
                return opened
            case DepositMoney():
                self._require_movable(command.currency)
                self._require_room_for(command.amount)
                return [MoneyDeposited(amount=command.amount)]
            case WithdrawMoney():
                self._require_movable(command.currency)
                self._require_funds(command.amount)
                return [MoneyWithdrawn(amount=command.amount)]
            case DebitForTransfer():
                self._require_movable(None)
                self._require_funds(command.amount)
                return [
                    MoneyDebitedForTransfer(
                        transfer_id=command.transfer_id,
                        amount=command.amount,
                        currency=self.currency,
                        to_account_id=command.to_account_id,
                    )
                ]
            case CreditFromTransfer():
                self._require_movable(command.currency)
                self._require_room_for(command.amount)
                return [
                    MoneyCreditedFromTransfer(
                        transfer_id=command.transfer_id,
                        amount=command.amount,
                        from_account_id=command.from_account_id,
                    )
                ]
            case RefundTransferDebit():
                # A refund lands whatever the status: the money left this account and must
                # come back for the ledger to balance.
                self._require_pending(command.transfer_id)
                return [
                    TransferDebitRefunded(
                        transfer_id=command.transfer_id,
                        amount=command.amount,
                        code=command.code,
                        reason=command.reason,
                    )
                ]
            case SettleTransferDebit():
                self._require_pending(command.transfer_id)
                return [TransferDebitSettled(transfer_id=command.transfer_id)]
            case FreezeAccount():
                self._require_status("open")
                return [AccountFrozen()]
            case UnfreezeAccount():
                self._require_status("frozen")
                return [AccountUnfrozen()]
            case CloseAccount():
                self._require_status("open")
                if self.pending_debits:
                    raise DomainError(
                        "transfer_pending", f"account {self.id} has transfers in flight"
                    )
                if self.balance != 0:
                    raise DomainError(
                        "balance_not_zero",
                        f"an account closes only at zero balance (balance is {self.balance})",
                    )
                return [AccountClosed()]
        raise DomainError("unsupported_command", f"account does not handle {command.type_name()}")

    def _require_funds(self, amount: int) -> None:
        if amount > self.balance:
            raise DomainError(
                "insufficient_funds", f"cannot take {amount}: balance is {self.balance}"
            )

    def _require_room_for(self, amount: int) -> None:
        if self.balance + sum(self.pending_debits.values()) + amount > MAX_BALANCE:
            raise DomainError(
                "balance_limit_exceeded",
                f"balance would exceed the limit of {MAX_BALANCE} minor units",
            )

    def _require_pending(self, transfer_id: UUID) -> None:
        if transfer_id not in self.pending_debits:
            raise DomainError(
                "no_pending_debit", f"account {self.id} holds no debit for transfer {transfer_id}"
            )

    def _require_movable(self, currency: str | None) -> None:
        self._require_status("open")
        if currency is not None and currency != self.currency:
            raise DomainError(
                "currency_mismatch",
                f"account {self.id} holds {self.currency}, not {currency}",
            )

    def _require_status(self, wanted: Status) -> None:
        if self.status == wanted:
            return
        reasons = {
            "new": ("account_not_found", f"account {self.id} does not exist"),
            "open": ("account_open", f"account {self.id} is open"),
            "frozen": ("account_frozen", f"account {self.id} is frozen"),
            "closed": ("account_closed", f"account {self.id} is closed"),
        }
        code, message = reasons[self.status]
        raise DomainError(code, message)
