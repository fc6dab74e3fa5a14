"""`cqrs`: the project's command-line tool.

    cqrs send OpenAccount owner_id=alice currency=EUR initial_deposit=1000
    cqrs get                       # the query API's routes
    cqrs get account <id> min_version=3
    cqrs status [--watch 2]
    cqrs rebuild accounts
    cqrs dlq list | cqrs dlq replay --id <command id>
    cqrs parked list | cqrs parked replay [--id <event id>] | cqrs parked drop --id <event id>
    cqrs load --rate 100 --duration 30 --mix open=1,deposit=5,withdraw=3,transfer=1,invalid=0.1

Tables by default, `--json` for scripts. Settings come from `CQRS_*` variables (`CQRS_AMQP_URL`,
`CQRS_QUERY_URL`, `CQRS_COMMAND_URL`) or options.
"""

from __future__ import annotations

import logging

import typer

from cqrs_cli import (
    dlq_command,
    get_command,
    load_command,
    parked_command,
    rebuild_command,
    send_command,
    status_command,
)

app = typer.Typer(
    help="Send commands, read models, watch and operate the CQRS pair.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command(cls=send_command.SendCommandHelp)(send_command.send)
app.command()(get_command.get)
app.command()(status_command.status)
app.command()(rebuild_command.rebuild)
app.add_typer(dlq_command.app, name="dlq")
app.add_typer(parked_command.app, name="parked")
app.command()(load_command.load)


def main() -> None:
    # The tool reports connection failures itself; the AMQP libraries' own log lines about
    # them would say it twice.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    app()
