"""The ledger's read models; add one here to have it projected, served and rebuildable."""

from __future__ import annotations

from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import READ_MODELS_COLLECTION, Document
from query_service.adapters.read_models import ReadModelCatalog, ReadModelRegistry
from query_service.projections.accounts import AccountsReadModel
from query_service.projections.owners import OwnerSummariesReadModel
from query_service.projections.read_model import ReadModel
from query_service.projections.transactions import TransactionsReadModel
from query_service.projections.transfers import TransfersReadModel


def ledger_read_models() -> list[ReadModel]:
    return [
        AccountsReadModel(),
        TransactionsReadModel(),
        OwnerSummariesReadModel(),
        TransfersReadModel(),
    ]


def build_catalog(database: AsyncDatabase[Document]) -> ReadModelCatalog:
    """The ledger's read models over `database`, with their generation pointers."""
    return ReadModelCatalog(
        database, ledger_read_models(), ReadModelRegistry(database[READ_MODELS_COLLECTION])
    )
