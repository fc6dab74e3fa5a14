"""The read side's queries: plain functions over the read-model collections."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict
from pymongo.asynchronous.database import AsyncDatabase

from query_service.adapters.mongo import ACCOUNTS_COLLECTION, Document


class AccountView(BaseModel):
    """An account as the read model holds it and the API shows it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: UUID
    owner_id: str
    currency: str
    balance: int
    status: Literal["open", "frozen", "closed"]
    version: int
    opened_at: datetime
    updated_at: datetime


_ACCOUNT_FIELDS: dict[str, int] = {"_id": 0} | {name: 1 for name in AccountView.model_fields}


async def account_detail(
    account_id: UUID, *, database: AsyncDatabase[Document]
) -> AccountView | None:
    """The account with this id, or `None` when the read model does not know it (yet)."""
    found = await database[ACCOUNTS_COLLECTION].find_one(
        {"_id": str(account_id)}, projection=_ACCOUNT_FIELDS
    )
    return None if found is None else AccountView.model_validate(found)
