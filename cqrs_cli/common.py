"""What every `cqrs` command shares: settings, consoles, JSON output, errors, HTTP reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from functools import cache
from typing import Annotated, Any, NoReturn, TypeVar

import aio_pika
import httpx
import typer
from rich.console import Console
from rich.markup import escape

from cqrs_cli.settings import CliSettings
from shared.client import BrokerRefusedError, BrokerUnavailableError

T = TypeVar("T")

# Exit codes: 1 the answer was an error (not found, rejected, failed); 2 a service did not answer.
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")]
AmqpOption = Annotated[
    str | None, typer.Option("--amqp-url", envvar="CQRS_AMQP_URL", show_default=False)
]
QueryUrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        "--query-url",
        envvar="CQRS_QUERY_URL",
        help="the query service [default: http://127.0.0.1:8000]",
        show_default=False,
    ),
]


@cache
def settings() -> CliSettings:
    return CliSettings()


@cache
def out() -> Console:
    return Console(highlight=False)


@cache
def err() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def amqp_url(given: str | None) -> str:
    return given or settings().amqp_url


def query_url(given: str | None) -> str:
    return (given or settings().query_url).rstrip("/")


# Connection failures worth a one-line message rather than a traceback.
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (
    BrokerUnavailableError,
    OSError,
    aio_pika.exceptions.AMQPConnectionError,
)


def broker_unavailable(error: BaseException) -> NoReturn:
    """The one way every command says the broker is not there: a short error, exit code 2."""
    text = str(error).removeprefix("broker unavailable: ") or type(error).__name__
    fail(f"broker unavailable: {text}", EXIT_UNREACHABLE)


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a broker that does not answer is a short error and exit code 2."""
    try:
        return asyncio.run(work)
    except UNREACHABLE_ERRORS as e:
        broker_unavailable(e)
    except BrokerRefusedError as e:
        fail(str(e))


def auth_headers() -> dict[str, str]:
    """The query API's bearer token (`CQRS_API_TOKEN`), when one is set."""
    token = settings().api_token
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def http_get(
    base: str, path: str, params: dict[str, Any] | None = None, *, timeout: float = 10.0
) -> httpx.Response:
    """GET from a service; a connection failure is a short error and exit code 2."""
    query = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        return httpx.get(f"{base}{path}", params=query, headers=auth_headers(), timeout=timeout)
    except httpx.TransportError as e:
        fail(f"{base} does not answer: {e!r}", EXIT_UNREACHABLE)


def error_detail(response: httpx.Response) -> str:
    """The API's error `detail` as one line."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return str(detail)


def expect_ok(response: httpx.Response, what: str) -> Any:
    """The JSON body of a 2xx answer; otherwise the error on stderr and a non-zero exit."""
    if response.is_success:
        return response.json()
    fail(f"{what}: {response.status_code} {error_detail(response)}")


def money(amount: int | None, currency: str | None = None) -> str:
    """Minor units as they are (the ledger has no decimal places of its own)."""
    if amount is None:
        return "-"
    return f"{amount:,}" + (f" {currency}" if currency else "")
