"""`python -m query_service`: run the projector and the HTTP API in one event loop.

`CQRS_RUN_PROJECTOR` / `CQRS_RUN_API` choose the parts, so each can be scaled on its own.
SIGTERM or SIGINT stops consuming, lets in-flight messages finish, stops the API and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import structlog
import uvicorn

from query_service.bootstrap import bootstrap
from shared.http_server import server_config
from shared.logging import configure_logging
from shared.settings import QueryServiceSettings
from shared.tracing import configure_tracing, shutdown_tracing

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


class ApiServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to this process's own shutdown sequence."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would install its own handlers and re-raise the signal after serving,
        # which would kill the process before the projector has drained.
        yield


async def serve(settings: QueryServiceSettings) -> None:
    """Run until SIGTERM/SIGINT (or until the API server stops by itself), then shut down."""
    if not (settings.run_projector or settings.run_api):
        raise SystemExit("nothing to run: CQRS_RUN_PROJECTOR and CQRS_RUN_API are both false")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    service = await bootstrap(settings)
    server: ApiServer | None = None
    api_task: asyncio.Task[None] | None = None
    try:
        if service.app is not None:
            # No `limit_concurrency`: uvicorn counts connections with it, so idle ones would
            # make the probes fail. The app sheds by requests in flight instead (limits.py).
            server = ApiServer(
                server_config(
                    service.app,
                    header_timeout=settings.http_header_timeout_seconds,
                    host=settings.http_host,
                    port=settings.http_port,
                    lifespan="on",
                )
            )
            api_task = asyncio.create_task(server.serve(), name="http-api")
        log.info(
            "query_service_started",
            projector=settings.run_projector,
            api=settings.run_api,
            http=f"{settings.http_host}:{settings.http_port}" if settings.run_api else None,
        )
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stopping.wait())}
        if api_task is not None:
            waiters.add(api_task)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        log.info("query_service_stopping", signal_received=stopping.is_set())
    finally:
        # Projector first: it drains while the API still answers reads.
        await service.stop_projector(SHUTDOWN_GRACE_SECONDS)
        if server is not None and api_task is not None:
            server.should_exit = True
            await asyncio.gather(api_task, return_exceptions=True)
        await service.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("query_service_stopped")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    settings = QueryServiceSettings()
    configure_logging(settings.log_level, settings.log_json)
    configure_tracing("query-service", settings)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings))
    finally:
        shutdown_tracing()
    sys.exit(0)


if __name__ == "__main__":
    main()
