"""The HTTP API in processes of its own beside the projector's, so a read never waits behind
projection work on one event loop.

The projector's process binds the API's port and starts `CQRS_API_PROCESSES` children
(`python -m query_service --api-process`) that serve it from that one listening socket (the
kernel spreads connections over them). Each child is a task of the projector's supervisor: one
that exits is started again with backoff, counted in `cqrs_task_failures_total{task}` and,
failing in a row, named in `/readyz`. Children live in a session of their own, so a terminal's
Ctrl-C reaches the parent alone, which stops them last: the projector drains while they answer.

Each child holds one end of a socket pair to the parent (the link): the parent writes a report
(its projector's counters, its supervisor's failures and failing tasks) as a line of JSON every
`REPORT_SECONDS`, and at once when the child asks (a `/metrics` or `/readyz` being served), so
the child's `/metrics` and `/readyz` show the projector as if it ran in the same process. A
rebuild asked for over HTTP is started in the parent too (`POST /admin/rebuilds` asks over the
link and answers with the parent's reply): replaying events into read models is projection
work, which the API processes leave to the projector's. The link closing (the parent died, even
by SIGKILL) makes the child stop too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from typing import Any, Protocol

import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from cqrs_runtime.supervision import Failure, Supervisor
from query_service.metrics import ProjectorMetrics
from query_service.service_layer.catalog import RebuildConflictError
from query_service.settings import QueryServiceSettings

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

API_PROCESS_ARG = "--api-process"
REPORT_SECONDS = 1.0
# A child whose parent has not reported this long takes the projector for stuck.
STALE_AFTER_SECONDS = 10.0
# How long a `/metrics` or `/readyz` waits for a fresh report before using the last one.
REFRESH_TIMEOUT_SECONDS = 0.5
# Reports are not queued beyond this for a child that does not read them (stopped, stuck).
MAX_UNREAD_BYTES = 1 << 16
REFRESH = b"?\n"
BIND_PATIENCE_SECONDS = 15.0


# How long `POST /admin/rebuilds` waits for the projector's process to start the rebuild.
REBUILD_CALL_TIMEOUT_SECONDS = 30.0
BROKER_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *CONNECTION_EXCEPTIONS)


class Rebuilds(Protocol):
    """What `POST /admin/rebuilds` starts a rebuild with: here, or in the projector's process."""

    async def start(self, read_models: list[str]) -> str:
        """The new rebuild's id; `RebuildConflictError` when one of them is being rebuilt."""
        ...


class RebuildNotStartedError(Exception):
    """The projector's process could not start the rebuild (its log says why)."""


def api_task_name(index: int) -> str:
    return f"api-process-{index}"


async def bind_listener(
    host: str, port: int, *, patience_seconds: float = BIND_PATIENCE_SECONDS
) -> socket.socket:
    """The API's listening socket, bound here so that every child (and every restarted one)
    accepts on the same port. A port in use is tried again for `patience_seconds` (the API
    processes of a predecessor killed a moment ago let go of it when they notice), then stops
    the service."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + patience_seconds
    while True:
        try:
            listener = socket.create_server((host, port), family=family, backlog=2048)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            log.warning("api_port_in_use", port=port, retry_in_seconds=0.2)
            await asyncio.sleep(0.2)
            continue
        listener.set_inheritable(True)
        return listener


# --- the projector's side ------------------------------------------------------------------


def metrics_report(metrics: ProjectorMetrics | None) -> dict[str, Any]:
    """`metrics` as JSON values, field by field (so a counter added to it travels too)."""
    if metrics is None:
        return {}
    found: dict[str, Any] = {}
    for item in dataclasses.fields(metrics):
        value = getattr(metrics, item.name)
        found[item.name] = value.isoformat() if isinstance(value, datetime) else value
    return found


class ApiProcesses:
    """Starts, supervises and stops the API's child processes."""

    def __init__(
        self,
        settings: QueryServiceSettings,
        listener: socket.socket,
        *,
        supervisor: Supervisor,
        metrics: ProjectorMetrics | None,
        rebuilds: Rebuilds | None = None,
        command: list[str] | None = None,
    ) -> None:
        self._settings = settings
        self._listener = listener
        self._supervisor = supervisor
        self._metrics = metrics
        self._rebuilds = rebuilds
        self._calls: set[asyncio.Task[None]] = set()
        self._command = command or [sys.executable, "-m", "query_service", API_PROCESS_ARG]
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p in sorted(self._processes.items()) if p.returncode is None]

    def start(self) -> None:
        for index in range(self._settings.api_processes):
            self._supervisor.spawn(
                api_task_name(index), partial(self._run, index), restart_on_return=True
            )

    def report(self) -> bytes:
        readiness = self._supervisor.readiness()
        body = {
            "metrics": metrics_report(self._metrics),
            "failures_total": dict(self._supervisor.failures_total),
            "failing": readiness["failing"],
        }
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    async def _run(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            env = {**os.environ, "CQRS_RUN_PROJECTOR": "false", "CQRS_RUN_API": "true"}
            process = await asyncio.create_subprocess_exec(
                *self._command,
                f"--listen-fd={self._listener.fileno()}",
                f"--link-fd={theirs.fileno()}",
                env=env,
                pass_fds=(self._listener.fileno(), theirs.fileno()),
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._processes[index] = process
        log.info("api_process_started", index=index, pid=process.pid)
        link = asyncio.create_task(self._serve_link(ours), name=f"api-link-{index}")
        try:
            code = await process.wait()
        finally:
            link.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link
            ours.close()
            if process.returncode is None:
                process.kill()
                await process.wait()
        if self._stopping:
            log.info("api_process_stopped", index=index, pid=process.pid, code=code)
            return
        raise Failure("api_process_exited", f"API process {index} exited with {code}")

    async def _serve_link(self, ours: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=ours)
        try:
            while True:
                try:
                    async with asyncio.timeout(REPORT_SECONDS):
                        line = await reader.readline()
                    if not line:
                        return  # the child closed its end: it is going
                except TimeoutError:
                    line = REFRESH
                if line != REFRESH:
                    self._answer(line, writer)
                elif writer.transport.get_write_buffer_size() < MAX_UNREAD_BYTES:
                    writer.write(self.report())
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> None:
        """A child's call (a rebuild to start), answered in a task of its own."""
        try:
            call = json.loads(line)
            number, read_models = int(call["call"]), [str(name) for name in call["rebuild"]]
        except (ValueError, TypeError, KeyError) as e:
            log.warning("api_process_call_unreadable", error=repr(e))
            return

        async def answer() -> None:
            reply: dict[str, Any] = {"reply": number}
            try:
                if self._rebuilds is None:
                    raise RebuildNotStartedError("no rebuilds in this process")
                reply["rebuild_id"] = await self._rebuilds.start(read_models)
            except RebuildConflictError as e:
                reply["error"], reply["message"] = "conflict", str(e)
            except BROKER_ERRORS as e:
                log.warning("rebuild_not_started", reason="broker_unavailable", error=repr(e))
                reply["error"], reply["message"] = "broker_unavailable", "broker unavailable"
            except Exception as e:
                log.error("rebuild_not_started", exc_info=e)
                reply["error"], reply["message"] = "failed", "the rebuild could not start"
            if not writer.is_closing():
                writer.write(json.dumps(reply).encode() + b"\n")

        task = asyncio.create_task(answer(), name=f"api-call-{number}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def stop(self, grace_seconds: float) -> None:
        """SIGTERM to every child (each stops serving and exits), then wait for them."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        await asyncio.gather(
            *(
                self._supervisor.stop(api_task_name(index), timeout=grace_seconds)
                for index in range(self._settings.api_processes)
            )
        )


# --- the API process's side ----------------------------------------------------------------


@dataclasses.dataclass
class ProjectorReports:
    """What the API process knows of the projector in its parent, from the last report."""

    metrics: ProjectorMetrics = dataclasses.field(default_factory=ProjectorMetrics)
    failures_total: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    failing: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    received_at: float | None = None

    def apply(self, report: Mapping[str, Any]) -> None:
        metrics = self.metrics
        for item in dataclasses.fields(metrics):
            if item.name not in report.get("metrics", {}):
                continue
            value = report["metrics"][item.name]
            current = getattr(metrics, item.name)
            if isinstance(current, collections.Counter):
                value = collections.Counter(value)
            elif isinstance(value, str) and "datetime" in str(item.type):
                value = datetime.fromisoformat(value)
            setattr(metrics, item.name, value)
        self.failures_total = collections.Counter(report.get("failures_total", {}))
        self.failing = list(report.get("failing", []))
        self.received_at = time.monotonic()

    def readiness(self) -> dict[str, Any]:
        """The `projector` check: the parent reported lately."""
        if self.received_at is None:
            return {"ok": False, "reason": "projector_not_reporting"}
        age = time.monotonic() - self.received_at
        if age > STALE_AFTER_SECONDS:
            return {
                "ok": False,
                "reason": "projector_not_reporting",
                "seconds_since_report": round(age, 1),
            }
        return {"ok": True, "seconds_since_report": round(age, 1)}


class ProjectorLink:
    """The API process's end of the link: reads reports, asks for fresh ones, has rebuilds
    started by the parent, and calls `on_lost` when the parent is gone."""

    def __init__(self, sock: socket.socket, reports: ProjectorReports) -> None:
        self._sock = sock
        self.reports = reports
        self._writer: asyncio.StreamWriter | None = None
        self._fresh = asyncio.Event()
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._numbers = iter(range(1, sys.maxsize))
        self.rebuilds = RemoteRebuilds(self)

    async def run(self, on_lost: Callable[[], None]) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                    if "reply" in message:
                        self._replied(message)
                        continue
                    self.reports.apply(message)
                except (ValueError, TypeError) as e:
                    log.warning("projector_report_unreadable", error=repr(e))
                    continue
                self._fresh.set()
                self._fresh = asyncio.Event()
        except (ConnectionError, OSError) as e:
            log.warning("projector_link_failed", error=repr(e))
        finally:
            self._writer.close()
            self._writer = None
            for pending in self._calls.values():
                if not pending.done():
                    pending.set_exception(ConnectionError("the projector's process is gone"))
        log.warning("projector_link_closed")
        on_lost()

    def _replied(self, message: dict[str, Any]) -> None:
        pending = self._calls.get(int(message["reply"]))
        if pending is not None and not pending.done():
            pending.set_result(message)

    async def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send `request` to the parent and wait for its reply (`TimeoutError`, or
        `ConnectionError` when the parent is gone)."""
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError("the projector's process is gone")
        number = next(self._numbers)
        pending: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[number] = pending
        try:
            self._writer.write(json.dumps({**request, "call": number}).encode() + b"\n")
            async with asyncio.timeout(timeout):
                return await pending
        finally:
            del self._calls[number]

    async def refresh(self, timeout: float = REFRESH_TIMEOUT_SECONDS) -> None:
        """Ask for a report and wait for it, at most `timeout` (a busy or stopped projector
        leaves the last one in place)."""
        if self._writer is None or self._writer.is_closing():
            return
        fresh = self._fresh
        self._writer.write(REFRESH)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await fresh.wait()


class RemoteRebuilds:
    """`Rebuilds` in the projector's process, asked over the link."""

    def __init__(self, link: ProjectorLink) -> None:
        self._link = link

    async def start(self, read_models: list[str]) -> str:
        try:
            reply = await self._link.call(
                {"rebuild": read_models}, timeout=REBUILD_CALL_TIMEOUT_SECONDS
            )
        except (TimeoutError, ConnectionError) as e:
            raise RebuildNotStartedError("the projector's process did not answer") from e
        error = reply.get("error")
        if error == "conflict":
            raise RebuildConflictError(str(reply.get("message")))
        if error == "broker_unavailable":
            raise ConnectionError(str(reply.get("message")))
        if error is not None:
            raise RebuildNotStartedError(str(reply.get("message")))
        return str(reply["rebuild_id"])
