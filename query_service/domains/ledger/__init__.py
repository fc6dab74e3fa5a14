"""The bank ledger's read side: accounts, transactions, owners' summaries and transfers, and the
routes that serve them. Its contracts are `shared.ledger`."""

from __future__ import annotations

from query_service.domain import QueryDomain
from query_service.domains.ledger.accounts import AccountsReadModel
from query_service.domains.ledger.owners import OwnerSummariesReadModel
from query_service.domains.ledger.routes import router
from query_service.domains.ledger.transactions import TransactionsReadModel
from query_service.domains.ledger.transfers import TransfersReadModel

domain = QueryDomain(
    name="ledger",
    read_models=(
        AccountsReadModel(),
        TransactionsReadModel(),
        OwnerSummariesReadModel(),
        TransfersReadModel(),
    ),
    routes=router,
)
