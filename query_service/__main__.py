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

import structlog
import uvicorn
from fastapi import FastAPI

from cqrs_runtime.http_server import server_config
from cqrs_runtime.logging import configure_logging
from cqrs_runtime.supervision import Failure
from cqrs_runtime.tracing import configure_tracing, shutdown_tracing
from query_service.bootstrap import bootstrap
from query_service.settings import QueryServiceSettings

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


class ApiServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to this process's own shutdown sequence."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would install its own handlers and re-raise the signal after serving,
        # which would kill the process before the projector has drained.
        yield


API_TASK = "http-api"


class ApiEndpoint:
    """The API's uvicorn server, run under the supervisor: one that fails is replaced by a new
    one (its lifespan, and so its MongoDB and broker links, are set up again)."""

    def __init__(self, app: FastAPI, settings: QueryServiceSettings) -> None:
        self._app = app
        self._settings = settings
        self.server: ApiServer | None = None

    async def run(self) -> None:
        settings = self._settings
        # No `limit_concurrency`: uvicorn counts connections with it, so idle ones would
        # make the probes fail. The app sheds by requests in flight instead (limits.py).
        self.server = server = ApiServer(
            server_config(
                self._app,
                header_timeout=settings.http_header_timeout_seconds,
                host=settings.http_host,
                port=settings.http_port,
                lifespan="on",
            )
        )
        try:
            await server.serve()
        except SystemExit as e:  # uvicorn's answer to a port it cannot bind
            raise Failure("http_start_failed", "the API server could not start") from e

    def ask_to_exit(self) -> None:
        if self.server is not None:
            self.server.should_exit = True


async def serve(settings: QueryServiceSettings) -> None:
    """Run until SIGTERM/SIGINT, then shut down. The API server runs under the supervisor."""
    if not (settings.run_projector or settings.run_api):
        raise SystemExit("nothing to run: CQRS_RUN_PROJECTOR and CQRS_RUN_API are both false")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    service = await bootstrap(settings)
    endpoint: ApiEndpoint | None = None
    try:
        if service.app is not None:
            endpoint = ApiEndpoint(service.app, settings)
            service.supervisor.spawn(API_TASK, endpoint.run, restart_on_return=True)
        log.info(
            "query_service_started",
            projector=settings.run_projector,
            api=settings.run_api,
            http=f"{settings.http_host}:{settings.http_port}" if settings.run_api else None,
        )
        await stopping.wait()
        log.info("query_service_stopping")
    finally:
        # Projector first: it drains while the API still answers reads.
        await service.stop_projector(SHUTDOWN_GRACE_SECONDS)
        if endpoint is not None:
            await service.supervisor.stop(
                API_TASK, timeout=SHUTDOWN_GRACE_SECONDS, ask=endpoint.ask_to_exit
            )
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
