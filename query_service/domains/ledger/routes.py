"""The ledger's routes: accounts, their transactions, owners' summaries, transfers.

Every query parameter is declared in a model that forbids unknown ones and gives each a type
(UUID, constrained string, bounded integer, enum), so bad input is a 422 naming the parameter
and nothing a client sends reaches MongoDB as anything but a plain value. Each route with
`min_version` / `min_position` reads through `Fresh.read` (read-your-writes).
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, HTTPException, Query
from pydantic import Field

from query_service.domains.ledger.views import (
    AccountPage,
    AccountsCursor,
    AccountStatus,
    AccountView,
    InvalidCursorError,
    OwnerSummaryView,
    TransactionPage,
    TransactionsCursor,
    TransferView,
    account_detail,
    account_transactions,
    decode_cursor,
    list_accounts,
    owner_account_version,
    owner_summary,
    transaction_head,
    transfer_status,
)
from query_service.entrypoints.api.dependencies import Catalog, Params
from query_service.entrypoints.api.errors import FRESHNESS, UNAVAILABLE
from query_service.entrypoints.api.freshness import Freshness, FreshReads
from shared.ledger import Currency, OwnerId

ACCOUNT_NOT_FOUND = "account not found"
OWNER_NOT_FOUND = "owner not found"
TRANSFER_NOT_FOUND = "transfer not found"
MAX_PAGE = 200
DEFAULT_PAGE = 50
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,512}$"

router = APIRouter(tags=["ledger"])


class AccountListParams(Params):
    owner_id: OwnerId | None = None
    status: AccountStatus | None = None
    currency: Currency | None = None
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, pattern=CURSOR_PATTERN)


class TransactionParams(Freshness):
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, pattern=CURSOR_PATTERN)


class SummaryParams(Freshness):
    account_id: UUID | None = Field(
        default=None, description="the account `min_version` / `min_position` refer to"
    )
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="accounts per page")
    cursor: str | None = Field(default=None, pattern=CURSOR_PATTERN)


def _cursor(token: str | None, model: type[Any]) -> Any:
    if token is None:
        return None
    try:
        return decode_cursor(token, model)
    except InvalidCursorError as e:
        raise HTTPException(
            status_code=422,
            detail=[{"loc": ["query", "cursor"], "msg": str(e), "type": "value_error"}],
        ) from e


def _versioned(view: AccountView | TransferView) -> tuple[int, int]:
    return view.version, view.last_position


def _reached(document: dict[str, Any]) -> tuple[int, int]:
    return int(document["version"]), int(document["last_position"])


@router.get(
    "/accounts/{account_id}", response_model=AccountView, responses=FRESHNESS, name="account"
)
async def get_account(
    account_id: UUID, params: Annotated[Freshness, Query()], catalog: Catalog, fresh: FreshReads
) -> AccountView:
    """One account. With `min_version`/`min_position`, waits for the projection to get there."""
    account = await fresh.read(
        lambda: account_detail(account_id, catalog=catalog),
        params,
        reached=_versioned,
        what=f"account {account_id}",
    )
    if account is None:
        raise HTTPException(status_code=404, detail=ACCOUNT_NOT_FOUND)
    return account


@router.get("/accounts", response_model=AccountPage, responses=UNAVAILABLE, name="accounts")
async def get_accounts(
    params: Annotated[AccountListParams, Query()], catalog: Catalog
) -> AccountPage:
    """Accounts filtered by owner, status and currency, in account-id order, page by page."""
    return await list_accounts(
        catalog=catalog,
        owner_id=params.owner_id,
        status=params.status,
        currency=params.currency,
        limit=params.limit,
        cursor=_cursor(params.cursor, AccountsCursor),
    )


@router.get(
    "/accounts/{account_id}/transactions",
    response_model=TransactionPage,
    responses=FRESHNESS,
    name="transactions",
)
async def get_transactions(
    account_id: UUID,
    params: Annotated[TransactionParams, Query()],
    catalog: Catalog,
    fresh: FreshReads,
) -> TransactionPage:
    """The account's deposits, withdrawals and transfer legs, newest first, page by page."""
    cursor = _cursor(params.cursor, TransactionsCursor)
    head = await fresh.read(
        lambda: transaction_head(account_id, catalog=catalog),
        params,
        reached=_reached,
        what=f"transactions of account {account_id}",
    )
    if head is None:
        raise HTTPException(status_code=404, detail=ACCOUNT_NOT_FOUND)
    return await account_transactions(
        account_id, catalog=catalog, head=head, limit=params.limit, cursor=cursor
    )


@router.get(
    "/owners/{owner_id}/summary",
    response_model=OwnerSummaryView,
    responses=FRESHNESS,
    name="owner",
)
async def get_owner_summary(
    owner_id: OwnerId,
    params: Annotated[SummaryParams, Query()],
    catalog: Catalog,
    fresh: FreshReads,
) -> OwnerSummaryView:
    """An owner's accounts, page by page, and its total balance per currency.

    `accounts` is one page in account-id order (pass `next_cursor` back as `cursor`); `totals`
    always covers all the owner's accounts. The summary spans several accounts, which are
    projected independently; to read your write, name the account the command touched:
    `?account_id=<id>&min_version=<version>`.
    """
    cursor = _cursor(params.cursor, AccountsCursor)
    if params.wanted:
        if params.account_id is None:
            raise HTTPException(
                status_code=422,
                detail=[
                    {
                        "loc": ["query", "account_id"],
                        "msg": "min_version / min_position on a summary need the account_id "
                        "they refer to: the summary spans accounts projected independently",
                        "type": "missing",
                    }
                ],
            )
        account_id = params.account_id
        await fresh.read(
            lambda: owner_account_version(owner_id, account_id, catalog=catalog),
            params,
            reached=_reached,
            what=f"summary of owner {owner_id} (account {account_id})",
        )
    summary = await owner_summary(owner_id, catalog=catalog, limit=params.limit, cursor=cursor)
    if summary is None:
        raise HTTPException(status_code=404, detail=OWNER_NOT_FOUND)
    return summary


@router.get(
    "/transfers/{transfer_id}", response_model=TransferView, responses=FRESHNESS, name="transfer"
)
async def get_transfer(
    transfer_id: UUID, params: Annotated[Freshness, Query()], catalog: Catalog, fresh: FreshReads
) -> TransferView:
    """A transfer's status: pending, completed or failed (with the reason)."""
    transfer = await fresh.read(
        lambda: transfer_status(transfer_id, catalog=catalog),
        params,
        reached=_versioned,
        what=f"transfer {transfer_id}",
    )
    if transfer is None:
        raise HTTPException(status_code=404, detail=TRANSFER_NOT_FOUND)
    return transfer
