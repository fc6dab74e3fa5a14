"""The bank ledger, as the command service runs it: accounts, transfers and the process manager
that drives a transfer, and who may do what. Its contracts are `shared.ledger`."""

from __future__ import annotations

from command_service.domains.ledger.account import Account
from command_service.domains.ledger.ownership import owners_policy
from command_service.domains.ledger.transfer import Transfer, TransferProcess
from command_service.model.domain import CommandDomain

domain = CommandDomain(
    name="ledger",
    aggregates=(Account, Transfer),
    process_managers=(TransferProcess(),),
    policy=owners_policy,
)
