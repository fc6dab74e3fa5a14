"""The bank ledger's public contract: command payloads and event data.

Amounts are integers in minor units (cents for EUR). Owner ids are opaque strings; aggregate ids
travel in the envelope, not here.
"""

from __future__ import annotations

from typing import Annotated, Self
from uuid import UUID

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from shared.contracts import DomainContracts
from shared.messages import Command, Event

ACCOUNT = "account"
TRANSFER = "transfer"

# A single amount; balances are capped separately so sums stay well inside 64 bits.
MAX_AMOUNT = 10**12
MAX_BALANCE = 10**15

Amount = Annotated[int, Field(strict=True, gt=0, le=MAX_AMOUNT)]
OwnerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")]

# Active ISO 4217 codes (2024 list), without funds, precious metals and testing codes.
ISO_4217 = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
    BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
    GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
    KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK
    MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR
    SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS
    UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()
)


def _check_currency(value: str) -> str:
    if value not in ISO_4217:
        raise ValueError("must be an active ISO 4217 code in upper case, e.g. EUR")
    return value


Currency = Annotated[str, AfterValidator(_check_currency)]


class _AccountCommand(Command):
    aggregate_type = ACCOUNT


class OpenAccount(_AccountCommand):
    owner_id: OwnerId
    currency: Currency
    initial_deposit: Annotated[int, Field(strict=True, ge=0, le=MAX_AMOUNT)] = 0


class DepositMoney(_AccountCommand):
    amount: Amount
    # Optional guard: when given, it must match the account's currency.
    currency: Currency | None = None


class WithdrawMoney(_AccountCommand):
    amount: Amount
    currency: Currency | None = None


class FreezeAccount(_AccountCommand):
    pass


class UnfreezeAccount(_AccountCommand):
    pass


class CloseAccount(_AccountCommand):
    pass


class RequestTransfer(Command):
    """Move `amount` from one account to another; the command's aggregate id is the transfer id."""

    aggregate_type = TRANSFER
    from_account_id: UUID
    to_account_id: UUID
    amount: Amount

    @model_validator(mode="after")
    def _distinct_accounts(self) -> Self:
        if self.from_account_id == self.to_account_id:
            raise ValueError("from_account_id and to_account_id must differ")
        return self


# Steps of a transfer, issued by the transfer process manager inside the command service.
# They are internal: the command service refuses them from the broker.


class DebitForTransfer(_AccountCommand):
    transfer_id: UUID
    amount: Amount
    to_account_id: UUID


class CreditFromTransfer(_AccountCommand):
    transfer_id: UUID
    amount: Amount
    currency: Currency
    from_account_id: UUID


class RefundTransferDebit(_AccountCommand):
    transfer_id: UUID
    amount: Amount
    code: str
    reason: str


class SettleTransferDebit(_AccountCommand):
    transfer_id: UUID


class CompleteTransfer(Command):
    aggregate_type = TRANSFER


class FailTransfer(Command):
    aggregate_type = TRANSFER
    code: str
    reason: str


class AccountOpened(Event):
    owner_id: str
    currency: str


class MoneyDeposited(Event):
    amount: int


class MoneyWithdrawn(Event):
    amount: int


class AccountFrozen(Event):
    pass


class AccountUnfrozen(Event):
    pass


class AccountClosed(Event):
    pass


class MoneyDebitedForTransfer(Event):
    transfer_id: UUID
    amount: int
    currency: str
    to_account_id: UUID


class MoneyCreditedFromTransfer(Event):
    transfer_id: UUID
    amount: int
    from_account_id: UUID


class TransferDebitRefunded(Event):
    transfer_id: UUID
    amount: int
    code: str
    reason: str


class TransferDebitSettled(Event):
    transfer_id: UUID


class TransferRequested(Event):
    from_account_id: UUID
    to_account_id: UUID
    amount: int


class TransferCompleted(Event):
    pass


class TransferFailed(Event):
    code: str
    reason: str


# The events an account's stream holds, and a transfer's.
ACCOUNT_EVENTS: tuple[type[Event], ...] = (
    AccountOpened,
    MoneyDeposited,
    MoneyWithdrawn,
    AccountFrozen,
    AccountUnfrozen,
    AccountClosed,
    MoneyDebitedForTransfer,
    MoneyCreditedFromTransfer,
    TransferDebitRefunded,
    TransferDebitSettled,
)
TRANSFER_EVENTS: tuple[type[Event], ...] = (TransferRequested, TransferCompleted, TransferFailed)

COMMANDS: tuple[type[Command], ...] = (
    OpenAccount,
    DepositMoney,
    WithdrawMoney,
    FreezeAccount,
    UnfreezeAccount,
    CloseAccount,
    RequestTransfer,
)
INTERNAL_COMMANDS: tuple[type[Command], ...] = (
    DebitForTransfer,
    CreditFromTransfer,
    RefundTransferDebit,
    SettleTransferDebit,
    CompleteTransfer,
    FailTransfer,
)
EVENTS: tuple[type[Event], ...] = (
    AccountOpened,
    MoneyDeposited,
    MoneyWithdrawn,
    AccountFrozen,
    AccountUnfrozen,
    AccountClosed,
    MoneyDebitedForTransfer,
    MoneyCreditedFromTransfer,
    TransferDebitRefunded,
    TransferDebitSettled,
    TransferRequested,
    TransferCompleted,
    TransferFailed,
)

# What clients may send (the transfer steps stay internal) and see.
contracts = DomainContracts(name="ledger", commands=COMMANDS, events=EVENTS)
