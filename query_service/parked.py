"""`python -m query_service.parked list|replay|drop`: the projector's parked events.

    python -m query_service.parked list [--limit 100]     # JSON, oldest first; stay parked
    python -m query_service.parked replay                  # all, back to their partitions
    python -m query_service.parked replay --id <message id> [--id ...]
    python -m query_service.parked drop --id <message id>  # delete for good

A replayed event goes back onto the projector's partitioned exchange with its original routing
key and headers; if it still cannot be applied it is parked again, with the new reason.
Settings come from the `CQRS_*` environment variables.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from aio_pika.abc import AbstractConnection

from query_service.adapters import broker
from query_service.adapters.parked import drop_parked, list_parked, replay_parked, to_json
from query_service.settings import QueryServiceSettings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The projector's parked events: list them, replay them, or drop them.",
)

T = TypeVar("T")


def _run(work: Callable[[AbstractConnection], Awaitable[T]]) -> T:
    async def run() -> T:
        connection = await broker.connect(QueryServiceSettings().amqp_url)
        try:
            return await work(connection)
        finally:
            await connection.close()

    return asyncio.run(run())


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="at most this many")] = 100,
) -> None:
    """Print parked events as JSON: id, type, aggregate, version, position, reason, body."""
    print(to_json(_run(lambda connection: list_parked(connection, limit=limit))))


@app.command("replay")
def replay_command(
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="message id (event id); default: all")
    ] = None,
) -> None:
    """Send parked events back to the projector."""
    wanted = set(ids) if ids else None
    result = _run(lambda connection: replay_parked(connection, message_ids=wanted))
    print(json.dumps({"replayed": result.moved, "still_parked": result.left}))


@app.command("drop")
def drop_command(
    ids: Annotated[list[str], typer.Option("--id", help="message id (event id) to delete")],
) -> None:
    """Delete parked events for good (after inspecting them with `list`)."""
    result = _run(lambda connection: drop_parked(connection, message_ids=set(ids)))
    print(json.dumps({"dropped": result.moved, "still_parked": result.left}))


if __name__ == "__main__":
    app()
