"""`python -m query_service.rebuild <read-model>...`: rebuild read models, printing progress.

    python -m query_service.rebuild accounts
    python -m query_service.rebuild --all
    python -m query_service.rebuild --status

Asks the command service for a replay over RabbitMQ, fills a new generation of each read model
while the live projector keeps going and queries keep being served, and switches to it once it
has caught up. Prints a progress line (events done / total, rate, ETA) every second; exits 0 when
every read model was switched, 1 when the rebuild failed (the current generation is untouched).
Settings come from the `CQRS_*` environment variables, as for `python -m query_service`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from typing import Annotated

import typer

from query_service.adapters import broker
from query_service.adapters.mongo import create_client
from query_service.adapters.read_models import RebuildConflictError
from query_service.adapters.replay import AmqpReplaySource
from query_service.entrypoints.http import rebuild_policy
from query_service.projections.ledger import build_catalog
from query_service.service_layer.rebuild import Rebuild, RebuildError, RebuildProgress
from shared.logging import configure_logging
from shared.settings import QueryServiceSettings

app = typer.Typer(
    add_completion=False,
    help="Rebuild read models from a replay of the event store, without stopping queries.",
)


def _print(progress: RebuildProgress) -> None:
    print(progress.describe(), flush=True)


async def rebuild(settings: QueryServiceSettings, read_models: list[str]) -> RebuildProgress:
    """Run one rebuild of `read_models` to the end; raises if it fails."""
    mongo = create_client(settings.mongo_url)
    connection = await broker.connect(settings.amqp_url)
    try:
        catalog = build_catalog(mongo[settings.mongo_db])
        source = AmqpReplaySource(
            connection,
            batch_size=settings.rebuild_batch_size,
            start_timeout=settings.rebuild_start_timeout_seconds,
            idle_timeout=settings.rebuild_idle_timeout_seconds,
        )
        job = Rebuild(
            catalog,
            source,
            read_models,
            policy=rebuild_policy(settings),
            owner=f"cli@{socket.gethostname()}:{os.getpid()}",
            on_progress=_print,
        )
        return await job.run()
    finally:
        await connection.close()
        await mongo.close()


async def status(settings: QueryServiceSettings) -> list[dict[str, object]]:
    mongo = create_client(settings.mongo_url)
    try:
        catalog = build_catalog(mongo[settings.mongo_db])
        found = []
        for name in catalog.models:
            document = await catalog.registry.document(name) or {}
            found.append(
                {
                    "name": name,
                    "current": document.get("current", 1),
                    "target": document.get("target"),
                    "rebuild": document.get("rebuild"),
                }
            )
        return found
    finally:
        await mongo.close()


@app.command()
def main(
    read_models: Annotated[
        list[str] | None, typer.Argument(help="accounts, transactions, owner_summaries, transfers")
    ] = None,
    all_models: Annotated[bool, typer.Option("--all", help="rebuild every read model")] = False,
    show_status: Annotated[
        bool, typer.Option("--status", help="show generations and rebuild progress, then exit")
    ] = False,
) -> None:
    """Rebuild read models from a replay of the event store, without stopping queries.

    Prints events done / total, rate and ETA every second; switches each read model to its new
    generation once it has caught up with the live stream. Exit 0: switched; 1: failed (the
    current generation is untouched).
    """
    settings = QueryServiceSettings()
    configure_logging(settings.log_level, settings.log_json)
    if show_status:
        print(json.dumps(asyncio.run(status(settings)), indent=2, default=str))
        return
    if all_models:
        from query_service.projections.ledger import ledger_read_models

        read_models = [model.name for model in ledger_read_models()]
    if not read_models:
        raise typer.BadParameter("name at least one read model, or pass --all")
    try:
        asyncio.run(rebuild(settings, read_models))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    except (RebuildError, RebuildConflictError) as e:
        print(f"rebuild failed: {e}", file=sys.stderr)
        raise typer.Exit(1) from e


if __name__ == "__main__":
    app()
