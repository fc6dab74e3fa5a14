"""`cqrs`: send commands and read the query service from a shell.

cqrs send OpenAccount owner_id=alice currency=EUR initial_deposit=1000
cqrs send DepositMoney --id <account-id> amount=250
cqrs get account <account-id>
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated, Any

import httpx
import typer

from shared.client import CommandClient, CommandTimeoutError
from shared.ledger import COMMANDS
from shared.messages import CommandEnvelope, CommandMetadata
from shared.settings import CommonSettings

app = typer.Typer(help="Send commands to the command service and read the query service.")
get_app = typer.Typer(help="Read models from the query service.")
app.add_typer(get_app, name="get")

AGGREGATE_TYPES = {command.type_name(): command.aggregate_type for command in COMMANDS}


def _parse_fields(pairs: list[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw  # a bare word is a string
    return fields


@app.command()
def send(
    command_type: Annotated[str, typer.Argument(help="e.g. OpenAccount, DepositMoney")],
    fields: Annotated[list[str] | None, typer.Argument(help="payload fields as key=value")] = None,
    aggregate_id: Annotated[
        str | None, typer.Option("--id", help="aggregate id (a new one when omitted)")
    ] = None,
    expected_version: Annotated[int | None, typer.Option(help="optimistic concurrency")] = None,
    aggregate_type: Annotated[
        str | None, typer.Option(help="for command types the ledger does not define")
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait for the reply")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the reply")] = 10.0,
    amqp_url: Annotated[str | None, typer.Option(envvar="CQRS_AMQP_URL")] = None,
) -> None:
    """Publish a command and print the reply as JSON."""
    target = aggregate_type or AGGREGATE_TYPES.get(command_type)
    if target is None:
        raise typer.BadParameter(f"unknown command type {command_type!r}; pass --aggregate-type")
    envelope = CommandEnvelope(
        type=command_type,
        aggregate_id=uuid.UUID(aggregate_id) if aggregate_id else uuid.uuid4(),
        expected_version=expected_version,
        payload=_parse_fields(fields or []),
        metadata=CommandMetadata(user="cli"),
    )
    url = amqp_url or CommonSettings().amqp_url
    exit_code = asyncio.run(_send(url, envelope, target, wait=wait, timeout=timeout))
    raise typer.Exit(exit_code)


async def _send(
    url: str, envelope: CommandEnvelope, aggregate_type: str, *, wait: bool, timeout: float
) -> int:
    client = await CommandClient.connect(url)
    try:
        if not wait:
            await client.publish(envelope, aggregate_type, reply=False)
            typer.echo(
                json.dumps(
                    {
                        "command_id": str(envelope.command_id),
                        "status": "sent",
                        "aggregate_id": str(envelope.aggregate_id),
                    }
                )
            )
            return 0
        try:
            reply = await client.send(envelope, aggregate_type, timeout=timeout)
        except CommandTimeoutError as e:
            typer.echo(str(e), err=True)
            return 2
    finally:
        await client.close()
    typer.echo(reply.model_dump_json(indent=2))
    return 0 if reply.status != "rejected" else 1


@get_app.command("account")
def get_account(
    account_id: str,
    url: Annotated[str, typer.Option(envvar="CQRS_QUERY_URL")] = "http://127.0.0.1:8000",
) -> None:
    """Print an account's read model."""
    response = httpx.get(f"{url.rstrip('/')}/accounts/{account_id}", timeout=10)
    typer.echo(json.dumps(response.json(), indent=2))
    if response.status_code != 200:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
