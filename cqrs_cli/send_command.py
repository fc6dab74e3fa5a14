"""`cqrs send`: publish a command and show the reply.

cqrs send OpenAccount owner_id=alice currency=EUR initial_deposit=1000
cqrs send DepositMoney --id <account-id> amount=250 --json
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from cqrs_cli.common import EXIT_ERROR, EXIT_UNREACHABLE, AmqpOption, JsonOption, amqp_url, out
from cqrs_cli.common import err as err_console
from cqrs_cli.common import run as run_async
from shared.client import CommandClient, CommandServiceUnavailableError, CommandTimeoutError
from shared.ledger import COMMANDS
from shared.messages import CommandEnvelope, CommandMetadata

AGGREGATE_TYPES = {command.type_name(): command.aggregate_type for command in COMMANDS}
STATUS_STYLES = {"accepted": "green", "duplicate": "yellow", "rejected": "red", "sent": "cyan"}


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
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for the broker and the reply")
    ] = 10.0,
    as_json: JsonOption = False,
    amqp: AmqpOption = None,
) -> None:
    """Publish a command and show the reply.

    Exit 0: accepted (or a duplicate); 1: rejected, or refused by the broker; 2: no reply in
    time, no command service, or the broker unavailable (also when it does not come back
    within --timeout).
    """
    target = aggregate_type or AGGREGATE_TYPES.get(command_type)
    if target is None:
        raise typer.BadParameter(f"unknown command type {command_type!r}; pass --aggregate-type")
    try:
        aggregate = uuid.UUID(aggregate_id) if aggregate_id else uuid.uuid4()
    except ValueError as e:
        raise typer.BadParameter(f"--id must be a UUID, got {aggregate_id!r}") from e
    envelope = CommandEnvelope(
        type=command_type,
        aggregate_id=aggregate,
        expected_version=expected_version,
        payload=_parse_fields(fields or []),
        metadata=CommandMetadata(user="cli"),
    )
    exit_code = run_async(
        _send(amqp_url(amqp), envelope, target, wait=wait, timeout=timeout, as_json=as_json)
    )
    raise typer.Exit(exit_code)


async def _send(
    url: str,
    envelope: CommandEnvelope,
    aggregate_type: str,
    *,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> int:
    # BrokerUnavailableError and BrokerRefusedError go to `run`: exit 2 and 1.
    try:
        async with await CommandClient.connect(url, timeout=timeout) as client:
            if not wait:
                await client.publish(envelope, aggregate_type, reply=False, timeout=timeout)
                sent = {
                    "command_id": str(envelope.command_id),
                    "status": "sent",
                    "aggregate_id": str(envelope.aggregate_id),
                }
                if as_json:
                    typer.echo(json.dumps(sent))
                else:
                    _show(sent, envelope.type)
                return 0
            reply = await client.send(envelope, aggregate_type, timeout=timeout)
    except (CommandTimeoutError, CommandServiceUnavailableError) as e:
        err_console().print(f"[bold red]error:[/] {escape(str(e))}")
        return EXIT_UNREACHABLE
    if as_json:
        typer.echo(reply.model_dump_json(indent=2))
    else:
        _show(reply.model_dump(mode="json"), envelope.type)
    return 0 if reply.status != "rejected" else EXIT_ERROR


def _show(reply: dict[str, Any], command_type: str) -> None:
    status = str(reply["status"])
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", f"[{STATUS_STYLES.get(status, 'white')}]{status}[/]")
    for key in ("aggregate_id", "command_id", "version", "position"):
        if reply.get(key) is not None:
            table.add_row(key, str(reply[key]))
    error = reply.get("error")
    if error:
        table.add_row("error", f"[red]{escape(error['code'])}[/]: {escape(error['message'])}")
    out().print(Panel(table, title=command_type, expand=False))
