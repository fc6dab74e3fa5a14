"""Transfers between accounts: the transfer aggregate and the process manager that drives it.

    RequestTransfer → TransferRequested
      → debit the source   ─ rejected → FailTransfer
      → credit the target  ─ rejected → refund the source → FailTransfer
      → settle the source's pending debit, CompleteTransfer

Money is conserved at every step: a debit is held on the source until it is settled or refunded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal
from uuid import UUID

from command_service.model.aggregate import Aggregate, DomainError
from command_service.model.process import (
    IssuedCommand,
    ProcessManager,
    RejectionHandler,
    step_id,
)
from shared.ledger import (
    TRANSFER,
    TRANSFER_EVENTS,
    CompleteTransfer,
    CreditFromTransfer,
    DebitForTransfer,
    FailTransfer,
    MoneyCreditedFromTransfer,
    MoneyDebitedForTransfer,
    RefundTransferDebit,
    RequestTransfer,
    SettleTransferDebit,
    TransferCompleted,
    TransferDebitRefunded,
    TransferFailed,
    TransferRequested,
)
from shared.messages import Command, Event, ReplyError

TransferStatus = Literal["new", "pending", "completed", "failed"]


class Transfer(Aggregate):
    """One transfer's lifecycle: pending, then completed or failed."""

    aggregate_type = TRANSFER
    commands = (RequestTransfer,)
    internal_commands = (CompleteTransfer, FailTransfer)
    events = TRANSFER_EVENTS

    def __init__(self, aggregate_id: UUID) -> None:
        super().__init__(aggregate_id)
        self.status: TransferStatus = "new"

    def apply(self, event: Event) -> None:
        match event:
            case TransferRequested():
                self.status = "pending"
            case TransferCompleted():
                self.status = "completed"
            case TransferFailed():
                self.status = "failed"

    def decide(self, command: Command) -> Sequence[Event]:
        match command:
            case RequestTransfer():
                if self.status != "new":
                    raise DomainError("transfer_exists", f"transfer {self.id} already exists")
                return [
                    TransferRequested(
                        from_account_id=command.from_account_id,
                        to_account_id=command.to_account_id,
                        amount=command.amount,
                    )
                ]
            case CompleteTransfer():
                self._require_pending()
                return [TransferCompleted()]
            case FailTransfer():
                self._require_pending()
                return [TransferFailed(code=command.code, reason=command.reason)]
        raise DomainError("unsupported_command", f"transfer does not handle {command.type_name()}")

    def _require_pending(self) -> None:
        if self.status != "pending":
            raise DomainError("transfer_not_pending", f"transfer {self.id} is {self.status}")


class TransferProcess(ProcessManager):
    """Drives each transfer from its request to completion or compensation."""

    name = "transfers"
    events = (
        TransferRequested,
        MoneyDebitedForTransfer,
        MoneyCreditedFromTransfer,
        TransferDebitRefunded,
    )

    def react(self, event: Event, aggregate_id: UUID) -> Sequence[IssuedCommand]:
        match event:
            case TransferRequested():
                return [self._debit(aggregate_id, event)]
            case MoneyDebitedForTransfer():
                return [self._credit(aggregate_id, event)]
            case MoneyCreditedFromTransfer(transfer_id=transfer_id):
                return [
                    self._issue(
                        transfer_id,
                        "settle",
                        event.from_account_id,
                        SettleTransferDebit(transfer_id=transfer_id),
                    ),
                    self._issue(transfer_id, "complete", transfer_id, CompleteTransfer()),
                ]
            case TransferDebitRefunded(transfer_id=transfer_id, code=code, reason=reason):
                return [self._fail(transfer_id, code, reason)]
        return []

    def _debit(self, transfer_id: UUID, event: TransferRequested) -> IssuedCommand:
        def debit_refused(error: ReplyError) -> Sequence[IssuedCommand]:
            return [self._fail(transfer_id, error.code, f"debit refused: {error.message}")]

        return self._issue(
            transfer_id,
            "debit",
            event.from_account_id,
            DebitForTransfer(
                transfer_id=transfer_id, amount=event.amount, to_account_id=event.to_account_id
            ),
            on_rejected=debit_refused,
        )

    def _credit(self, source: UUID, event: MoneyDebitedForTransfer) -> IssuedCommand:
        transfer_id = event.transfer_id

        def credit_refused(error: ReplyError) -> Sequence[IssuedCommand]:
            refund = RefundTransferDebit(
                transfer_id=transfer_id,
                amount=event.amount,
                code=error.code,
                reason=f"credit refused: {error.message}",
            )
            return [self._issue(transfer_id, "refund", source, refund)]

        return self._issue(
            transfer_id,
            "credit",
            event.to_account_id,
            CreditFromTransfer(
                transfer_id=transfer_id,
                amount=event.amount,
                currency=event.currency,
                from_account_id=source,
            ),
            on_rejected=credit_refused,
        )

    def _fail(self, transfer_id: UUID, code: str, reason: str) -> IssuedCommand:
        return self._issue(transfer_id, "fail", transfer_id, FailTransfer(code=code, reason=reason))

    def _issue(
        self,
        transfer_id: UUID,
        step: str,
        target: UUID,
        command: Command,
        on_rejected: RejectionHandler | None = None,
    ) -> IssuedCommand:
        return IssuedCommand(
            aggregate_id=target,
            command=command,
            command_id=step_id(self.name, transfer_id, step),
            on_rejected=on_rejected,
        )
