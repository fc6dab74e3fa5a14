"""`python -m query_service`: run the projector and the HTTP API.

`CQRS_RUN_PROJECTOR` / `CQRS_RUN_API` choose the parts, so each can be scaled on its own. With
both on, the API is served by `CQRS_API_PROCESSES` child processes of the projector's
(`entrypoints/api_processes.py`), so a read never waits behind projection work; `0` runs both in
one event loop. SIGTERM or SIGINT stops consuming, lets in-flight messages finish while the API
still answers, then stops the API and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
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
from query_service.adapters.broker import BrokerLink
from query_service.bootstrap import bootstrap
from query_service.domain import load_query_domains
from query_service.entrypoints.api.admin import RebuildRunner
from query_service.entrypoints.api.app import check_api_routes
from query_service.entrypoints.api_processes import (
    API_PROCESS_ARG,
    ApiProcesses,
    ProjectorLink,
    ProjectorReports,
    bind_listener,
)
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

    def __init__(
        self, app: FastAPI, settings: QueryServiceSettings, listen_fd: int | None = None
    ) -> None:
        self._app = app
        self._settings = settings
        self._listen_fd = listen_fd
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
        # A listening socket from the parent: a copy per run, as the server closes its own.
        sockets = (
            None if self._listen_fd is None else [socket.socket(fileno=os.dup(self._listen_fd))]
        )
        try:
            await server.serve(sockets=sockets)
        except SystemExit as e:  # uvicorn's answer to a port it cannot bind
            raise Failure("http_start_failed", "the API server could not start") from e

    def ask_to_exit(self) -> None:
        if self.server is not None:
            self.server.should_exit = True


async def serve(settings: QueryServiceSettings) -> None:
    """Run until SIGTERM/SIGINT, then shut down. The API server runs under the supervisor."""
    if not (settings.run_projector or settings.run_api):
        raise SystemExit("nothing to run: CQRS_RUN_PROJECTOR and CQRS_RUN_API are both false")
    if settings.run_projector and settings.run_api and settings.api_processes > 0:
        await serve_projector_with_api_processes(settings)
        return

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


async def serve_projector_with_api_processes(settings: QueryServiceSettings) -> None:
    """The projector here, the API in child processes that share this process's port; the
    children are stopped last, after the projector drained."""
    check_api_routes(load_query_domains(settings.domain_names))
    listener = await bind_listener(settings.http_host, settings.http_port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        service = await bootstrap(settings.model_copy(update={"run_api": False}))
        broker_link = BrokerLink(settings.amqp_url)
        rebuilds = RebuildRunner(service.catalog, broker_link, settings)
        processes = ApiProcesses(
            settings,
            listener,
            supervisor=service.supervisor,
            metrics=service.metrics,
            rebuilds=rebuilds,
        )
        try:
            processes.start()
            host, port = listener.getsockname()[:2]
            log.info(
                "query_service_started",
                projector=True,
                api=True,
                api_processes=settings.api_processes,
                http=f"{host}:{port}",
            )
            await stopping.wait()
            log.info("query_service_stopping")
        finally:
            # Projector first: it drains while the API processes still answer reads.
            await service.stop_projector(SHUTDOWN_GRACE_SECONDS)
            await processes.stop(SHUTDOWN_GRACE_SECONDS)
            await rebuilds.close()
            await broker_link.close()
            await service.close()
    finally:
        listener.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("query_service_stopped")


async def serve_api_process(settings: QueryServiceSettings, listen_fd: int, link_fd: int) -> None:
    """A child of `serve_projector_with_api_processes`: the API alone, on the parent's socket,
    until SIGTERM/SIGINT from the parent or until the parent is gone."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    link = ProjectorLink(socket.socket(fileno=link_fd), ProjectorReports())
    reading = asyncio.create_task(link.run(on_lost=stopping.set), name="projector-link")
    service = await bootstrap(settings, projector_link=link)
    assert service.app is not None
    endpoint = ApiEndpoint(service.app, settings, listen_fd)
    try:
        service.supervisor.spawn(API_TASK, endpoint.run, restart_on_return=True)
        log.info("api_process_serving", pid=os.getpid())
        await stopping.wait()
    finally:
        await service.supervisor.stop(
            API_TASK, timeout=SHUTDOWN_GRACE_SECONDS, ask=endpoint.ask_to_exit
        )
        # The port is free of this process from here, for a successor's projector to bind.
        os.close(listen_fd)
        await service.close()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("api_process_stopped", pid=os.getpid())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m query_service")
    # Set by the projector's process for the API processes it starts; not for operators.
    parser.add_argument(API_PROCESS_ARG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--link-fd", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = _arguments()
    settings = QueryServiceSettings()
    configure_logging(settings.log_level, settings.log_json)
    configure_tracing("query-service", settings)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            if arguments.api_process:
                if arguments.listen_fd is None or arguments.link_fd is None:
                    raise SystemExit(f"{API_PROCESS_ARG} needs --listen-fd and --link-fd")
                runner.run(serve_api_process(settings, arguments.listen_fd, arguments.link_fd))
            else:
                runner.run(serve(settings))
    finally:
        shutdown_tracing()
    sys.exit(0)


if __name__ == "__main__":
    main()
