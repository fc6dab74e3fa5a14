"""`cqrs get …`: read models from the query service, as tables or as JSON.

Exit 0: found; 1: not found or refused (the API's reason on stderr); 2: the API does not answer.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cqrs_cli.common import (
    JsonOption,
    QueryUrlOption,
    expect_ok,
    http_get,
    money,
    out,
    print_json,
    query_url,
)

app = typer.Typer(help="Read models from the query service.", no_args_is_help=True)

STATUS_STYLES = {
    "open": "green",
    "frozen": "cyan",
    "closed": "dim",
    "pending": "yellow",
    "completed": "green",
    "failed": "red",
}

MinVersion = Annotated[
    int | None, typer.Option(help="wait until the read model reflects this version")
]
Limit = Annotated[int, typer.Option(min=1, max=200, help="page size")]
Cursor = Annotated[str | None, typer.Option(help="next_cursor of the previous page")]


def _status(value: str) -> Text:
    return Text(value, style=STATUS_STYLES.get(value, "white"))


def _fields(title: str, rows: list[tuple[str, Any]]) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        grid.add_row(
            name, value if isinstance(value, Text) else Text("-" if value is None else str(value))
        )
    return Panel(grid, title=escape(title), expand=False)


def _next_page(body: dict[str, Any]) -> None:
    if body.get("next_cursor"):
        out().print(Text(f"more: --cursor {body['next_cursor']}", style="dim"))


@app.command("account")
def get_account(
    account_id: str,
    min_version: MinVersion = None,
    as_json: JsonOption = False,
    url: QueryUrlOption = None,
) -> None:
    """One account: owner, currency, balance, status and version."""
    base = query_url(url)
    body = expect_ok(
        http_get(base, f"/accounts/{account_id}", {"min_version": min_version}),
        f"account {account_id}",
    )
    if as_json:
        print_json(body)
        return
    out().print(
        _fields(
            f"account {body['id']}",
            [
                ("owner", body["owner_id"]),
                ("balance", money(body["balance"], body["currency"])),
                ("status", _status(body["status"])),
                ("version", body["version"]),
                ("last position", body.get("last_position")),
                ("opened", body.get("opened_at")),
                ("updated", body.get("updated_at")),
            ],
        )
    )


@app.command("accounts")
def get_accounts(
    owner: Annotated[str | None, typer.Option(help="only this owner's")] = None,
    status: Annotated[str | None, typer.Option(help="open, frozen or closed")] = None,
    currency: Annotated[str | None, typer.Option(help="ISO code, e.g. EUR")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    as_json: JsonOption = False,
    url: QueryUrlOption = None,
) -> None:
    """Accounts in id order, filtered by owner, status and currency, one page at a time."""
    params = {
        "owner_id": owner,
        "status": status,
        "currency": currency,
        "limit": limit,
        "cursor": cursor,
    }
    body = expect_ok(http_get(query_url(url), "/accounts", params), "accounts")
    if as_json:
        print_json(body)
        return
    table = Table(title="accounts")
    for column in ("id", "owner", "balance", "status", "version"):
        table.add_column(column, justify="right" if column in ("balance", "version") else "left")
    for item in body["items"]:
        table.add_row(
            item["id"],
            escape(item["owner_id"]),
            money(item["balance"], item["currency"]),
            _status(item["status"]),
            str(item["version"]),
        )
    out().print(table)
    _next_page(body)


@app.command("transactions")
def get_transactions(
    account_id: str,
    limit: Limit = 50,
    cursor: Cursor = None,
    min_version: MinVersion = None,
    as_json: JsonOption = False,
    url: QueryUrlOption = None,
) -> None:
    """An account's deposits, withdrawals and transfer legs, newest first."""
    params = {"limit": limit, "cursor": cursor, "min_version": min_version}
    body = expect_ok(
        http_get(query_url(url), f"/accounts/{account_id}/transactions", params),
        f"transactions of account {account_id}",
    )
    if as_json:
        print_json(body)
        return
    table = Table(title=f"transactions of {body['account_id']} (version {body['version']})")
    for column in ("version", "kind", "amount", "balance after", "recorded", "detail"):
        right = column in ("version", "amount", "balance after")
        table.add_column(column, justify="right" if right else "left")
    for item in body["items"]:
        detail = " ".join(
            f"{key}={item[key]}"
            for key in ("transfer_id", "counterparty_account_id", "code", "reason")
            if item.get(key)
        )
        amount = int(item["amount"])
        table.add_row(
            str(item["version"]),
            item["kind"],
            f"[{'green' if amount >= 0 else 'red'}]{amount:+,}[/]",
            money(item["balance_after"]),
            str(item["recorded_at"]),
            escape(detail),
        )
    out().print(table)
    _next_page(body)


@app.command("owner")
def get_owner(
    owner_id: str,
    limit: Limit = 50,
    cursor: Cursor = None,
    account: Annotated[
        str | None, typer.Option(help="with --min-version: the account it refers to")
    ] = None,
    min_version: MinVersion = None,
    as_json: JsonOption = False,
    url: QueryUrlOption = None,
) -> None:
    """An owner's total balance per currency and its accounts, one page at a time."""
    params = {"limit": limit, "cursor": cursor, "account_id": account, "min_version": min_version}
    body = expect_ok(
        http_get(query_url(url), f"/owners/{owner_id}/summary", params), f"owner {owner_id}"
    )
    if as_json:
        print_json(body)
        return
    totals = Table(title=escape(f"owner {body['owner_id']}: totals"))
    for column in ("currency", "balance", "accounts"):
        totals.add_column(column, justify="left" if column == "currency" else "right")
    for total in body["totals"]:
        totals.add_row(total["currency"], money(total["balance"]), str(total["accounts"]))
    count = sum(int(total["accounts"]) for total in body["totals"])
    accounts = Table(title=f"accounts ({len(body['accounts'])} of {count:,})")
    for column in ("id", "balance", "status", "version"):
        accounts.add_column(column, justify="right" if column in ("balance", "version") else "left")
    for item in body["accounts"]:
        accounts.add_row(
            item["id"],
            money(item["balance"], item["currency"]),
            _status(item["status"]),
            str(item["version"]),
        )
    out().print(totals)
    out().print(accounts)
    _next_page(body)


@app.command("transfer")
def get_transfer(
    transfer_id: str,
    min_version: MinVersion = None,
    as_json: JsonOption = False,
    url: QueryUrlOption = None,
) -> None:
    """A transfer's status: pending, completed or failed (with the reason)."""
    body = expect_ok(
        http_get(query_url(url), f"/transfers/{transfer_id}", {"min_version": min_version}),
        f"transfer {transfer_id}",
    )
    if as_json:
        print_json(body)
        return
    failure = body.get("failure")
    out().print(
        _fields(
            f"transfer {body['id']}",
            [
                ("status", _status(body["status"])),
                ("from", body["from_account_id"]),
                ("to", body["to_account_id"]),
                ("amount", money(body["amount"])),
                ("failure", f"{failure['code']}: {failure['reason']}" if failure else None),
                ("version", body["version"]),
                ("requested", body.get("requested_at")),
                ("updated", body.get("updated_at")),
            ],
        )
    )
