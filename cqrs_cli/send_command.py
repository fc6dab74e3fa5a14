"""`cqrs send`: publish a command of one of the configured domains and show the reply.

cqrs send OpenAccount owner_id=alice currency=EUR initial_deposit=1000
cqrs send DepositMoney --id <account-id> amount=250 --json

The command types, the aggregate type each targets and their fields come from the contracts of
the domains `CQRS_DOMAINS` names (`shared.contracts`); a value is read as the field's type
wants it: as it stands for a string field, as JSON otherwise (a bare word is a string).
"""

from __future__ import annotations

import json
import uuid
from functools import cache
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from typer.core import TyperCommand

from cqrs_cli.common import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    AmqpOption,
    JsonOption,
    amqp_url,
    fail,
    out,
    settings,
)
from cqrs_cli.common import err as err_console
from cqrs_cli.common import run as run_async
from shared.client import CommandClient, CommandServiceUnavailableError, CommandTimeoutError
from shared.contracts import ContractsError, command_types, load_contracts
from shared.messages import Command, CommandEnvelope, CommandMetadata

STATUS_STYLES = {"accepted": "green", "duplicate": "yellow", "rejected": "red", "sent": "cyan"}


@cache
def known_commands() -> dict[str, type[Command]]:
    """The command types of the configured domains; a domain that cannot be loaded, or two
    that name one command type, end the tool with the reason."""
    try:
        return command_types(load_contracts(settings().domain_names))
    except ContractsError as e:
        fail(f"CQRS_DOMAINS={settings().domains}: {e}")


def describe_commands(commands: dict[str, type[Command]]) -> list[str]:
    """One line per command: its type, the aggregate type it targets, its fields (`?` marks an
    optional one)."""
    lines = []
    for name, model in commands.items():
        fields = ", ".join(
            key if info.is_required() else f"{key}?" for key, info in model.model_fields.items()
        )
        lines.append(f"{name} ({model.aggregate_type}): {fields or '-'}")
    return lines


class SendCommandHelp(TyperCommand):
    """`cqrs send --help` ends with the commands of the configured domains."""

    # Typed loosely: typer's click types are its own private copy's.
    def format_help(self, ctx: Any, formatter: Any) -> None:
        try:
            lines = describe_commands(command_types(load_contracts(settings().domain_names)))
            known = f"Commands of the domains {settings().domains}:"
        except ContractsError as e:
            lines, known = [str(e)], f"The domains {settings().domains} cannot be loaded:"
        self.epilog = escape(known) + "\n\n" + "\n".join(escape(line) for line in lines)
        super().format_help(ctx, formatter)


def _json_types(schema: dict[str, Any], definitions: dict[str, Any]) -> set[str]:
    """The JSON types a field's schema admits (`string`, `integer`, ...; `any` when open)."""
    if "$ref" in schema:
        return _json_types(definitions.get(schema["$ref"].rsplit("/", 1)[-1], {}), definitions)
    if "anyOf" in schema or "oneOf" in schema:
        return set().union(
            *(
                _json_types(option, definitions)
                for option in schema.get("anyOf", schema.get("oneOf", []))
            )
        )
    kind = schema.get("type")
    if isinstance(kind, list):
        return set(kind)
    if isinstance(kind, str):
        return {kind}
    return (
        {"string"}
        if "enum" in schema and all(isinstance(v, str) for v in schema["enum"])
        else {"any"}
    )


def parse_fields(pairs: list[str], model: type[Command] | None) -> dict[str, Any]:
    """`key=value` pairs as the payload: a value for a field that takes only a string (or
    null) is that string as written (`owner_id=007`); any other is JSON, or a string when it
    is not JSON."""
    schema = model.model_json_schema() if model is not None else {}
    properties: dict[str, Any] = schema.get("properties", {})
    definitions: dict[str, Any] = schema.get("$defs", {})
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}")
        if key in properties and _json_types(properties[key], definitions) <= {"string", "null"}:
            fields[key] = raw
            continue
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw  # a bare word is a string
    return fields


def send(
    command_type: Annotated[
        str, typer.Argument(help="a command type of the configured domains (listed below)")
    ],
    fields: Annotated[list[str] | None, typer.Argument(help="payload fields as key=value")] = None,
    aggregate_id: Annotated[
        str | None, typer.Option("--id", help="aggregate id (a new one when omitted)")
    ] = None,
    expected_version: Annotated[int | None, typer.Option(help="optimistic concurrency")] = None,
    aggregate_type: Annotated[
        str | None,
        typer.Option(
            help="send a command type the configured domains do not define, to this aggregate "
            "type (its fields are read as JSON)"
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait for the reply")] = True,
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for the broker and the reply")
    ] = 10.0,
    as_json: JsonOption = False,
    amqp: AmqpOption = None,
) -> None:
    """Publish a command and show the reply.

    Exit 0: accepted (or a duplicate); 1: rejected, refused by the broker, or a command type
    the configured domains (`CQRS_DOMAINS`) do not define; 2: no reply in time, no command
    service, or the broker unavailable (also when it does not come back within --timeout).
    """
    model = None if aggregate_type is not None else known_commands().get(command_type)
    if model is None and aggregate_type is None:
        fail(
            f"unknown command type {command_type!r}; the domains {settings().domains} define:\n  "
            + "\n  ".join(describe_commands(known_commands()))
            + "\n(--aggregate-type sends a type they do not define)"
        )
    target = model.aggregate_type if model is not None else str(aggregate_type)
    try:
        aggregate = uuid.UUID(aggregate_id) if aggregate_id else uuid.uuid4()
    except ValueError as e:
        raise typer.BadParameter(f"--id must be a UUID, got {aggregate_id!r}") from e
    envelope = CommandEnvelope(
        type=command_type,
        aggregate_id=aggregate,
        expected_version=expected_version,
        payload=parse_fields(fields or [], model),
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
